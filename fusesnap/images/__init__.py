"""Whole images: pull and push through OCI layouts, image archives and registries, image records."""
