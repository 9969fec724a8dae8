"""Remote-attestation evidence (RA-TLS client certificates): parsing and verification."""
