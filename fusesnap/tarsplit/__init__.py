"""Tar parsing and the tar-split index: what the store needs to give a tar back byte for byte.

- `crc64`: CRC-64/ISO as Go's hash/crc64 computes it (tar-split's payload checksum).
- `header`: 512-byte header blocks, numeric fields, PAX records.
- `parser`: a streaming member parser that keeps every raw byte it consumes.
- `index`: the JSON-lines writer/reader in vbatts/tar-split's storage schema.
"""
