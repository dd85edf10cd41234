//! The built-in guest, built from guest/ and embedded as an ELF image.
