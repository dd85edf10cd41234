//! How one page of a `CompressedPages` frame is encoded, and how the backup decodes it.
//!
//! Three encodings, the sender choosing per page whichever is smallest:
//!
//! - [`PageEncoding::Raw`]: the page as is (`page_size` bytes).
//! - [`PageEncoding::Lz4`]: the page in the LZ4 block format (no frame, no checksum of its
//!   own: the frame CRC and the epoch checksum cover it).
//! - [`PageEncoding::XorLz4`]: a delta against the page's *base* — the contents the backup
//!   holds for that page as of its last committed epoch — as the XOR of the two pages,
//!   LZ4-compressed. The bytes a write left alone XOR to zero runs, which LZ4 reduces to a
//!   few bytes per run; the bytes it changed travel once, as literals. Same idea as QEMU's
//!   XBZRLE (runs of unchanged/changed bytes), done with a general codec so that changed
//!   bytes that happen to compress do.
//!
//! A decoded page must be exactly `page_size` bytes: LZ4 output that is shorter or would be
//! longer is an error, never a partial page. The decoder runs on untrusted input and is the
//! bounds-checked (`safe-decode`) implementation of `lz4_flex`.

/// How a page travels in a `CompressedPages` frame (the `u8` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageEncoding {
    /// The page itself.
    Raw = 0,
    /// LZ4 block of the page.
    Lz4 = 1,
    /// LZ4 block of the page XOR its base (the backup's committed copy).
    XorLz4 = 2,
}

impl PageEncoding {
    /// Every encoding, in wire order.
    pub const ALL: [PageEncoding; 3] = [Self::Raw, Self::Lz4, Self::XorLz4];

    /// The encoding of wire value `v`, if any.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }

    /// Whether decoding needs the page's base.
    pub fn needs_base(self) -> bool {
        self == Self::XorLz4
    }
}

/// A page that does not decode. The epoch it belongs to is rejected whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageCodecError {
    /// The LZ4 block is corrupt (or would write past the page).
    #[error("LZ4 block does not decode: {0}")]
    Lz4(String),
    /// The LZ4 block decodes to fewer bytes than a page.
    #[error("decodes to {got} bytes, not the page size {page_size}")]
    Length {
        /// Bytes decoded.
        got: usize,
        /// The page size.
        page_size: usize,
    },
    /// A delta arrived for a page whose base cannot be had.
    #[error("a delta page with no base to apply it to")]
    NoBase,
}

/// Room an LZ4 block of `len` input bytes may need (the encoders' output buffers).
pub fn max_lz4_len(len: usize) -> usize {
    lz4_flex::block::get_maximum_output_size(len)
}

/// Compresses `page` into `out` (at least [`max_lz4_len`] of it); returns the length, or
/// `None` when it would not be smaller than the page (send it raw).
pub fn encode_lz4(page: &[u8], out: &mut [u8]) -> Option<usize> {
    match lz4_flex::block::compress_into(page, out) {
        Ok(n) if n < page.len() => Some(n),
        _ => None,
    }
}

/// XORs `page` with `base` into `scratch` (page-sized) and compresses that into `out`;
/// returns the length, or `None` when not smaller than the page.
pub fn encode_xor_lz4(
    page: &[u8],
    base: &[u8],
    scratch: &mut [u8],
    out: &mut [u8],
) -> Option<usize> {
    xor_into(scratch, page, base);
    encode_lz4(scratch, out)
}

/// `dst = a ^ b`, word by word (all three the same length).
fn xor_into(dst: &mut [u8], a: &[u8], b: &[u8]) {
    const W: usize = 8;
    let mut d = dst.chunks_exact_mut(W);
    let mut x = a.chunks_exact(W);
    let mut y = b.chunks_exact(W);
    for ((d, x), y) in (&mut d).zip(&mut x).zip(&mut y) {
        let v = u64::from_ne_bytes(x.try_into().expect("8-byte chunk"))
            ^ u64::from_ne_bytes(y.try_into().expect("8-byte chunk"));
        d.copy_from_slice(&v.to_ne_bytes());
    }
    for ((d, x), y) in d
        .into_remainder()
        .iter_mut()
        .zip(x.remainder())
        .zip(y.remainder())
    {
        *d = x ^ y;
    }
}

/// `dst ^= src`.
fn xor_assign(dst: &mut [u8], src: &[u8]) {
    const W: usize = 8;
    let mut d = dst.chunks_exact_mut(W);
    let mut s = src.chunks_exact(W);
    for (d, s) in (&mut d).zip(&mut s) {
        let v = u64::from_ne_bytes((&*d).try_into().expect("8-byte chunk"))
            ^ u64::from_ne_bytes(s.try_into().expect("8-byte chunk"));
        d.copy_from_slice(&v.to_ne_bytes());
    }
    for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d ^= s;
    }
}

/// Decodes one page of `encoding` from `data` into `out` (exactly a page). `base` is the
/// page as the backup holds it (needed for [`PageEncoding::XorLz4`] only).
pub fn decode_page(
    encoding: PageEncoding,
    data: &[u8],
    base: Option<&[u8]>,
    out: &mut [u8],
) -> Result<(), PageCodecError> {
    let page_size = out.len();
    match encoding {
        PageEncoding::Raw => {
            if data.len() != page_size {
                return Err(PageCodecError::Length {
                    got: data.len(),
                    page_size,
                });
            }
            out.copy_from_slice(data);
        }
        PageEncoding::Lz4 | PageEncoding::XorLz4 => {
            let base = match (encoding.needs_base(), base) {
                (true, None) => return Err(PageCodecError::NoBase),
                (true, Some(b)) if b.len() != page_size => {
                    return Err(PageCodecError::Length {
                        got: b.len(),
                        page_size,
                    })
                }
                (_, b) => b,
            };
            let got = lz4_flex::block::decompress_into(data, out)
                .map_err(|e| PageCodecError::Lz4(e.to_string()))?;
            if got != page_size {
                return Err(PageCodecError::Length { got, page_size });
            }
            if let (true, Some(base)) = (encoding.needs_base(), base) {
                xor_assign(out, base);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 4096;

    fn random(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..PS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn round_trip(page: &[u8], base: Option<&[u8]>) -> Option<(PageEncoding, usize)> {
        let mut out = vec![0; max_lz4_len(PS)];
        let mut scratch = vec![0; PS];
        let (enc, n) = match base {
            Some(b) => (
                PageEncoding::XorLz4,
                encode_xor_lz4(page, b, &mut scratch, &mut out)?,
            ),
            None => (PageEncoding::Lz4, encode_lz4(page, &mut out)?),
        };
        let mut back = vec![0xa5; PS];
        decode_page(enc, &out[..n], base, &mut back).unwrap();
        assert_eq!(back, page);
        Some((enc, n))
    }

    #[test]
    fn a_quarter_changed_page_deltas_to_about_a_quarter() {
        let base = random(1);
        let mut page = base.clone();
        page[1000..2024].copy_from_slice(&random(2)[..1024]);
        let (_, n) = round_trip(&page, Some(&base)).unwrap();
        assert!(n < 1024 + 64, "{n} bytes for 1024 changed");
        // Without the base, the random page does not compress at all.
        assert_eq!(round_trip(&page, None), None);
    }

    #[test]
    fn zero_and_text_pages_compress_and_random_ones_do_not() {
        let (_, n) = round_trip(&[0u8; PS], None).unwrap();
        assert!(n < 64, "{n}");
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog; "
            .iter()
            .copied()
            .cycle()
            .take(PS)
            .collect();
        assert!(round_trip(&text, None).unwrap().1 < PS / 4);
        assert_eq!(round_trip(&random(9), None), None);
        assert_eq!(round_trip(&random(9), Some(&random(10))), None);
    }

    #[test]
    fn bad_input_is_an_error_never_a_partial_page() {
        let mut out = vec![0; PS];
        // Garbage.
        assert!(decode_page(PageEncoding::Lz4, &[0xff; 17], None, &mut out).is_err());
        // A valid block of a shorter input.
        let short = lz4_flex::block::compress(&[7u8; 100]);
        assert_eq!(
            decode_page(PageEncoding::Lz4, &short, None, &mut out),
            Err(PageCodecError::Length {
                got: 100,
                page_size: PS
            })
        );
        // A block of a longer input does not fit the page.
        let long = lz4_flex::block::compress(&[7u8; PS + 1]);
        assert!(matches!(
            decode_page(PageEncoding::Lz4, &long, None, &mut out),
            Err(PageCodecError::Lz4(_))
        ));
        let page = lz4_flex::block::compress(&[7u8; PS]);
        assert_eq!(
            decode_page(PageEncoding::XorLz4, &page, None, &mut out),
            Err(PageCodecError::NoBase)
        );
        assert!(decode_page(PageEncoding::Raw, &[0; PS - 1], None, &mut out).is_err());
        assert!(decode_page(PageEncoding::Lz4, &[], None, &mut out).is_err());
    }

    #[test]
    fn encodings_round_trip_through_u8() {
        for e in PageEncoding::ALL {
            assert_eq!(PageEncoding::from_u8(e as u8), Some(e));
        }
        assert_eq!(PageEncoding::from_u8(3), None);
    }
}
