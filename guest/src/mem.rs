//! The C memory functions the compiler expects (not provided for this target when
//! freestanding), and the heap.

use core::arch::asm;
use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Hand `[start, start + size)` to the global allocator, before any allocation.
///
/// # Safety
/// The range must be RAM used by nothing else for the rest of the guest's life, and this
/// must be the only call (`Heap::init` may run at most once, on the empty heap).
pub unsafe fn init_heap(start: usize, size: usize) {
    // SAFETY: exactly `Heap::init`'s contract, which the caller guarantees: the range is
    // RAM that nothing else uses, for good (the allocator hands it out and writes its free
    // list into it), and this is the one call on the still-empty heap.
    unsafe { HEAP.lock().init(start as *mut u8, size) };
}

/// Bytes of heap in use and free.
pub fn heap_usage() -> (usize, usize) {
    let h = HEAP.lock();
    (h.used(), h.free())
}

/// Copy `n` bytes upwards with `rep movsb` (fast on every CPU with ERMS, and native at
/// CPL 3).
///
/// # Safety
/// `[src, src + n)` must be readable and `[dest, dest + n)` writable. They may overlap
/// only with `dest <= src`: an upward copy reads each byte before it overwrites it.
#[inline(always)]
unsafe fn copy_forward(dest: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the ranges are valid (caller). Rust's asm rules guarantee DF is clear on
    // entry, so `rep movsb` copies RCX = n bytes from RSI upwards to RDI, writing only
    // [dest, dest + n); its result is that of a byte-by-byte copy, which the overlap the
    // caller may have (dest <= src) does not disturb. No stack use, no flag changes.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
}

/// # Safety
/// Standard C `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the C contract (src readable and dest writable for n bytes, no overlap) is
    // stricter than `copy_forward`'s.
    unsafe { copy_forward(dest, src, n) };
    dest
}

/// # Safety
/// Standard C `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: the ranges are valid (C contract), and dest is not in [src, src + n):
        // either dest < src, an overlap `copy_forward` allows, or the ranges are disjoint.
        // (Not `memcpy`: its contract forbids any overlap.)
        unsafe { copy_forward(dest, src, n) };
        return dest;
    }
    // SAFETY: dest is inside [src, src + n), so n > 0 and the last bytes of both ranges,
    // dest + n - 1 and src + n - 1, are inside the ranges the C contract makes valid. With
    // DF set, `rep movsb` copies n bytes downwards from there, reading each source byte
    // before the overlapping destination overwrites it, and writes only [dest, dest + n);
    // `cld` clears DF again before the block ends, as Rust's asm rules require. It changes
    // flags (hence no `preserves_flags`), and does not use the stack.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _,
             inout("rdi") dest.add(n).wrapping_sub(1) => _,
             inout("rsi") src.add(n).wrapping_sub(1) => _,
             options(nostack));
    }
    dest
}

/// # Safety
/// Standard C `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: [dest, dest + n) is writable (C contract). With DF clear (asm rules),
    // `rep stosb` stores AL, the low byte of `c` (C converts it to unsigned char), n times
    // upwards from dest and writes nothing else, no stack, no flags.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard C `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, so both 8-byte reads are inside [a, a + n) and [b, b + n),
        // which the C contract makes readable; `read_unaligned` needs no alignment.
        let (x, y) = unsafe {
            (
                (a.add(i) as *const u64).read_unaligned(),
                (b.add(i) as *const u64).read_unaligned(),
            )
        };
        if x != y {
            // The first differing byte decides: compare as big-endian numbers.
            return if x.swap_bytes() < y.swap_bytes() {
                -1
            } else {
                1
            };
        }
        i += 8;
    }
    while i < n {
        // SAFETY: i < n, so both bytes are inside the ranges the C contract makes readable.
        // (Volatile reads keep the compiler from turning this loop back into a call to
        // memcmp.)
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard C `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: bcmp's C contract (both ranges readable for n bytes) is memcmp's, and a
    // memcmp result is a valid bcmp result (zero if and only if equal).
    unsafe { memcmp(a, b, n) }
}
