"""Lab stand-ins for Intel and for real enclaves: attestation CA, enclave emulator, topology."""
