//! The two 8-bit state code books with their quantization lookup tables, built once.

use std::sync::OnceLock;

use nf4::{Codebook8, signed_dynamic_codebook, unsigned_dynamic_map};

/// The signed dynamic map (first moment).
pub fn signed() -> &'static Codebook8 {
    signed_dynamic_codebook()
}

/// The unsigned dynamic map (second moment).
pub fn unsigned() -> &'static Codebook8 {
    static BOOK: OnceLock<Codebook8> = OnceLock::new();
    BOOK.get_or_init(|| Codebook8::new(unsigned_dynamic_map()))
}
