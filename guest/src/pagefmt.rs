//! Layout and checksum of a workload page.
//!
//! Pure `core` code: also compiled into host unit tests by `twin-guest-image`.
//!
//! A page is 512 little-endian u64 words: `[0]` = page index, `[1]` = sequence number,
//! `[2]` = checksum of words `3..512`, `[3..512]` = the body: by default a pattern derived
//! from (index, seq), rewritten whole by every write ([`fill`]); with a write fraction
//! (`wfrac`) a write rewrites only a run of the body ([`rewrite`]), the rest staying as the
//! last write left it, so the body depends on the page's history and only the checksum
//! (over the whole body) says whether it is one the workload wrote.

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

/// What a write puts in the body words it changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Data {
    /// Pseudo-random words: incompressible.
    Random,
    /// Words of a small vocabulary separated by spaces, as text in memory: LZ4 makes them
    /// about a third.
    Text,
}

/// Body words of a page.
pub const BODY_WORDS: usize = WORDS - HEADER_WORDS;

const VOCABULARY: [&[u8]; 32] = [
    b"the",
    b"replica",
    b"of",
    b"a",
    b"page",
    b"is",
    b"what",
    b"the",
    b"backup",
    b"holds",
    b"when",
    b"an",
    b"epoch",
    b"commits",
    b"and",
    b"output",
    b"waits",
    b"for",
    b"its",
    b"acknowledgement",
    b"so",
    b"that",
    b"no",
    b"client",
    b"ever",
    b"sees",
    b"state",
    b"lost",
    b"in",
    b"failover",
    b"twin",
    b"memory",
];

/// Write number `seq` of page `index` rewriting `count` body words from body word `from`
/// (clamped to the body) with `data`; the rest of the body stays. Returns the checksum
/// stored. `fill` is the same with the whole body and a pattern of its own.
pub fn rewrite(
    page: &mut [u64; WORDS],
    index: u64,
    seq: u64,
    from: usize,
    count: usize,
    data: Data,
) -> u64 {
    let from = from.min(BODY_WORDS);
    let count = count.min(BODY_WORDS - from);
    let words = &mut page[HEADER_WORDS + from..HEADER_WORDS + from + count];
    let mut x = splitmix(index ^ seq.rotate_left(40) ^ 0x7465_7874);
    match data {
        Data::Random => {
            for w in words.iter_mut() {
                x = x.wrapping_add(GOLDEN);
                *w = splitmix(x);
            }
        }
        Data::Text => {
            // Bytes of words and spaces, eight to a word, little-endian.
            let (mut word, mut at) = (VOCABULARY[0], 0usize);
            for w in words.iter_mut() {
                let mut v = 0u64;
                for b in 0..8 {
                    let byte = if at < word.len() {
                        at += 1;
                        word[at - 1]
                    } else {
                        x = x.wrapping_add(GOLDEN);
                        word = VOCABULARY[(splitmix(x) % VOCABULARY.len() as u64) as usize];
                        at = 0;
                        b' '
                    };
                    v |= u64::from(byte) << (8 * b);
                }
                *w = v;
            }
        }
    }
    let sum = checksum(&page[HEADER_WORDS..]);
    page[0] = index;
    page[1] = seq;
    page[2] = sum;
    sum
}

/// Where write `seq` of page `index` starts rewriting `count` of the body's words: spread
/// over the body, the same for the same write.
pub fn rewrite_at(index: u64, seq: u64, count: usize) -> usize {
    let room = (BODY_WORDS - count.min(BODY_WORDS)) as u64 + 1;
    (splitmix(index.rotate_left(17) ^ seq) % room) as usize
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
