//! Layout and checksum of a workload page.
//!
//! Pure `core` code: also compiled into host unit tests by `twin-guest-image`.
//!
//! A page is 512 little-endian u64 words: `[0]` = page index, `[1]` = sequence number,
//! `[2]` = checksum of words `3..512`, `[3..512]` = a pattern derived from (index, seq).

/// Words in a 4 KiB page.
pub const WORDS: usize = 512;
/// Words of header before the body.
pub const HEADER_WORDS: usize = 3;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fill `page` as write number `seq` of page `index`; returns the checksum stored.
pub fn fill(page: &mut [u64; WORDS], index: u64, seq: u64) -> u64 {
    let base = splitmix(index ^ seq.rotate_left(40));
    let mut x = base;
    for w in page[HEADER_WORDS..].iter_mut() {
        x = x.wrapping_add(GOLDEN);
        *w = x ^ (x >> 29);
    }
    let sum = checksum(&page[HEADER_WORDS..]);
    page[0] = index;
    page[1] = seq;
    page[2] = sum;
    sum
}

/// Fletcher-style 64-bit checksum of the body (order-sensitive).
pub fn checksum(body: &[u64]) -> u64 {
    let (mut a, mut b) = (0u64, 0u64);
    for &w in body {
        a = a.wrapping_add(w);
        b = b.wrapping_add(a);
    }
    b ^ a.rotate_left(32) ^ 0x7477_696e_5041_4745
}

/// What is wrong with a page, if anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageError {
    /// The header's index is not the page's.
    Index { found: u64 },
    /// The header's sequence number is not the last one written.
    Seq { found: u64 },
    /// The body does not match the header's checksum.
    Checksum { stored: u64, computed: u64 },
    /// A page the workload never wrote has a non-zero header.
    NotZero,
}

/// Check page `index`, last written with sequence number `seq` (0: never written, so its
/// header must still be zero).
pub fn check(page: &[u64; WORDS], index: u64, seq: u64) -> Result<(), PageError> {
    if seq == 0 {
        if page[..HEADER_WORDS].iter().any(|&w| w != 0) {
            return Err(PageError::NotZero);
        }
        return Ok(());
    }
    if page[0] != index {
        return Err(PageError::Index { found: page[0] });
    }
    if page[1] != seq {
        return Err(PageError::Seq { found: page[1] });
    }
    let computed = checksum(&page[HEADER_WORDS..]);
    if computed != page[2] {
        return Err(PageError::Checksum {
            stored: page[2],
            computed,
        });
    }
    Ok(())
}
