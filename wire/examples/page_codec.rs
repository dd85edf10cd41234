//! Micro-benchmark of the page codec (`twin_wire::pagecodec`, `lz4_flex`) on one core: per
//! kind of page, the encoded size and the encode and decode speed of LZ4 and of the
//! XOR+LZ4 delta. Prints; asserts nothing about time.
//!
//! `cargo run --release -p twin-wire --example page_codec [pages]`

use std::time::Instant;
use twin_wire::pagecodec::{decode_page, encode_lz4, encode_xor_lz4, max_lz4_len};
use twin_wire::PageEncoding;

const PAGE: usize = 4096;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn random(x: &mut u64, buf: &mut [u8]) {
    for c in buf.chunks_mut(8) {
        let v = xorshift(x).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

fn text(x: &mut u64, buf: &mut [u8]) {
    const WORDS: [&[u8]; 8] = [
        b"the ",
        b"replica ",
        b"of ",
        b"page ",
        b"epoch ",
        b"commits ",
        b"output ",
        b"waits ",
    ];
    let mut at = 0;
    while at < buf.len() {
        let w = WORDS[(xorshift(x) % 8) as usize];
        let n = w.len().min(buf.len() - at);
        buf[at..at + n].copy_from_slice(&w[..n]);
        at += n;
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(8192);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    // (name, base, page): the page as the backup should decode it, its base for deltas.
    let mut cases: Vec<(&str, Vec<u8>, Vec<u8>)> = Vec::new();
    for (name, frac, is_text) in [
        ("random page, 5% changed", 5, false),
        ("random page, 25% changed", 25, false),
        ("random page, all new", 100, false),
        ("text page, 25% changed", 25, true),
        ("text page, all new", 100, true),
    ] {
        let mut base = vec![0u8; PAGE * n];
        let mut page = vec![0u8; PAGE * n];
        for i in 0..n {
            let b = &mut base[i * PAGE..(i + 1) * PAGE];
            let p = &mut page[i * PAGE..(i + 1) * PAGE];
            if is_text {
                text(&mut x, b);
            } else {
                random(&mut x, b);
            }
            p.copy_from_slice(b);
            let len = PAGE * frac / 100;
            let from = (xorshift(&mut x) as usize) % (PAGE - len + 1);
            if is_text {
                text(&mut x, &mut p[from..from + len]);
            } else {
                random(&mut x, &mut p[from..from + len]);
            }
        }
        cases.push((name, base, page));
    }
    cases.push(("zero page", vec![0; PAGE * n], vec![0; PAGE * n]));
    println!("{n} pages of 4 KiB per case, one core; MB/s of pages (4 KiB each)");
    println!("| page | LZ4 bytes | LZ4 enc MB/s | delta bytes | delta enc MB/s | delta dec MB/s |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let mut out = vec![0u8; max_lz4_len(PAGE)];
    let mut scratch = vec![0u8; PAGE];
    let mut dec = vec![0u8; PAGE];
    for (name, base, page) in &cases {
        let mb = (n * PAGE) as f64 / 1e6;
        let t = Instant::now();
        let mut lz4_bytes = 0usize;
        for i in 0..n {
            lz4_bytes += encode_lz4(&page[i * PAGE..(i + 1) * PAGE], &mut out).unwrap_or(PAGE);
        }
        let lz4_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut deltas = Vec::with_capacity(n);
        for i in 0..n {
            let p = &page[i * PAGE..(i + 1) * PAGE];
            let b = &base[i * PAGE..(i + 1) * PAGE];
            deltas
                .push(encode_xor_lz4(p, b, &mut scratch, &mut out).map(|len| out[..len].to_vec()));
        }
        let delta_s = t.elapsed().as_secs_f64();
        let delta_bytes: usize = deltas
            .iter()
            .map(|d| d.as_ref().map_or(PAGE, Vec::len))
            .sum();
        let t = Instant::now();
        for (i, d) in deltas.iter().enumerate() {
            if let Some(d) = d {
                let b = &base[i * PAGE..(i + 1) * PAGE];
                decode_page(PageEncoding::XorLz4, d, Some(b), &mut dec).expect("decodes");
                assert_eq!(dec, page[i * PAGE..(i + 1) * PAGE]);
            }
        }
        let dec_s = t.elapsed().as_secs_f64();
        println!(
            "| {name} | {} | {:.0} | {} | {:.0} | {:.0} |",
            lz4_bytes / n,
            mb / lz4_s,
            delta_bytes / n,
            mb / delta_s,
            mb / dec_s
        );
    }
}
