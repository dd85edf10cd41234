//! The CPL-0 part of the guest (assembly), the guest header, and CPU helpers used at CPL 3.
//!
//! Under PVM every CPL-0 instruction is emulated (~0.65 µs each), so the CPL-0 code is a
//! handful of instructions per event:
//!
//! * device / timer interrupt: `inc total; inc per-vector; EOI; iretq` (4 instructions);
//! * halt call (`ud2` with `RAX = 0x7477696e`, `RDI` = interrupt count last seen at CPL 3):
//!   `cmp; jne; add; cmp; jne; sti; hlt; iretq` (8 instructions, plus the waking interrupt);
//! * any other exception: print a report to COM1 and power off through port 0x501 with
//!   [`EXIT_CPU_EXCEPTION`].
//!
//! Everything else (timer programming, PCI, virtio, TCP) runs natively at CPL 3.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// `RAX` value that marks a `ud2` as the guest's halt call ("twin").
pub const HALT_MAGIC: u64 = 0x7477_696e;

/// Power-off status for a configuration error (bad `BootInfo` or guest arguments).
pub const EXIT_CONFIG: u8 = 1;
/// Power-off status for a Rust panic.
pub const EXIT_PANIC: u8 = 2;
/// Power-off status for an unexpected CPU exception (written by the CPL-0 fault path).
pub const EXIT_CPU_EXCEPTION: u8 = 3;
/// Power-off status for a device that does not behave (e.g. no virtio-net found).
pub const EXIT_DEVICE: u8 = 4;

/// LAPIC timer interrupt vector.
pub const VEC_TIMER: u8 = 0x20;
/// virtio-net configuration-change MSI-X vector.
pub const VEC_CONFIG: u8 = 0x21;
/// virtio-net receive queue MSI-X vector.
pub const VEC_RX: u8 = 0x22;
/// virtio-net transmit queue MSI-X vector.
pub const VEC_TX: u8 = 0x23;
/// virtio-blk request queue MSI-X vector (counted in `other_irqs`: the block driver waits
/// for its completions with the halt call, which any interrupt ends).
pub const VEC_BLK: u8 = 0x24;
/// Base of the (masked) legacy 8259 PIC vectors after remapping.
pub const VEC_PIC_BASE: u8 = 0x30;

/// Interrupt counters, incremented by the CPL-0 handlers. Index [`IRQ_TOTAL`] counts every
/// interrupt and is what the halt call compares against.
#[no_mangle]
pub static TWIN_IRQ_COUNTS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

/// Index of the all-interrupts counter in [`TWIN_IRQ_COUNTS`].
pub const IRQ_TOTAL: usize = 0;
/// Index of the timer counter.
pub const IRQ_TIMER: usize = 1;
/// Index of the virtio config-change counter.
pub const IRQ_CONFIG: usize = 2;
/// Index of the virtio RX counter.
pub const IRQ_RX: usize = 3;
/// Index of the virtio TX counter.
pub const IRQ_TX: usize = 4;
/// Index of the counter of any other vector.
pub const IRQ_OTHER: usize = 5;

/// Current value of one interrupt counter.
#[inline(always)]
pub fn irq_count(index: usize) -> u64 {
    TWIN_IRQ_COUNTS[index].load(Ordering::Relaxed)
}

// The guest header (first bytes of the image), the CPL-3 entry point, and the CPL-0
// handlers. Offsets into TWIN_IRQ_COUNTS: 0 total, 8 timer, 16 config, 24 rx, 32 tx,
// 40 other.
global_asm!(
    r#"
    .section .twin_header, "a"
    .balign 8
    .globl twin_guest_header
twin_guest_header:
    .ascii "TWINGST\0"
    .long 1                 /* version */
    .long 2080              /* header_size = 8 + 4 + 4 + 8 + 8 + 256 * 8 */
    .quad _start            /* entry */
    .quad __stack_top       /* stack_top */
    /* vectors[256] */
    .irp n, 0,1,2,3,4,5
    .quad twin_fault_\n
    .endr
    .quad twin_ud_handler   /* 6: #UD, also the halt call */
    .irp n, 7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad twin_fault_\n
    .endr
    .quad twin_irq_timer    /* 0x20 */
    .quad twin_irq_config   /* 0x21 */
    .quad twin_irq_rx       /* 0x22 */
    .quad twin_irq_tx       /* 0x23 */
    .rept 0xFF - 0x24
    .quad twin_irq_other    /* 0x24 ..= 0xFE */
    .endr
    .quad twin_irq_spurious /* 0xFF */

    /* The initial CPL-3 stack, inside the image's bss. */
    .section .bss.twin_stack, "aw", @nobits
    .balign 16
    .globl __stack_bottom
__stack_bottom:
    .space 262144
    .globl __stack_top
__stack_top:

    /* CPL-3 entry: RDI = &BootInfo. Zero the bss (the stack is in it, still unused), then
       call twin_main(boot_info) which never returns. */
    .section .text._start, "ax"
    .globl _start
_start:
    cld
    mov r12, rdi
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    mov rdi, r12
    lea rsp, [rip + __stack_top]
    xor ebp, ebp
    call twin_main
    ud2

    /* ---------------- CPL 0 ---------------- */
    .section .text.twin_cpl0, "ax"

    .balign 16
twin_irq_timer:
    inc qword ptr [rip + TWIN_IRQ_COUNTS]
    inc qword ptr [rip + TWIN_IRQ_COUNTS + 8]
    movabs dword ptr [0xFEE000B0], eax   /* LAPIC EOI (the value is ignored) */
    iretq

    .balign 16
twin_irq_config:
    inc qword ptr [rip + TWIN_IRQ_COUNTS]
    inc qword ptr [rip + TWIN_IRQ_COUNTS + 16]
    movabs dword ptr [0xFEE000B0], eax
    iretq

    .balign 16
twin_irq_rx:
    inc qword ptr [rip + TWIN_IRQ_COUNTS]
    inc qword ptr [rip + TWIN_IRQ_COUNTS + 24]
    movabs dword ptr [0xFEE000B0], eax
    iretq

    .balign 16
twin_irq_tx:
    inc qword ptr [rip + TWIN_IRQ_COUNTS]
    inc qword ptr [rip + TWIN_IRQ_COUNTS + 32]
    movabs dword ptr [0xFEE000B0], eax
    iretq

    .balign 16
twin_irq_other:
    inc qword ptr [rip + TWIN_IRQ_COUNTS]
    inc qword ptr [rip + TWIN_IRQ_COUNTS + 40]
    movabs dword ptr [0xFEE000B0], eax
    iretq

    /* Spurious LAPIC interrupts need no EOI. */
    .balign 16
twin_irq_spurious:
    iretq

    /* #UD: the halt call if RAX is the magic, otherwise a real fault. RDI holds the total
       interrupt count the CPL-3 code last saw; if an interrupt came since, return at once
       (interrupts are disabled here: this is an interrupt gate). */
    .balign 16
twin_ud_handler:
    cmp rax, 0x7477696e
    jne twin_fault_6
    add qword ptr [rsp], 2
    cmp rdi, qword ptr [rip + TWIN_IRQ_COUNTS]
    jne 1f
    sti
    hlt
1:  iretq

    /* Exceptions: push a uniform frame (error code, vector) and report. */
    .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
twin_fault_\n:
    push 0
    push \n
    jmp twin_fault_common
    .endr
    .irp n, 8,10,11,12,13,14,17,21,29,30
twin_fault_\n:
    push \n
    jmp twin_fault_common
    .endr

    /* Stack: rax, vector, error, rip, cs, rflags, rsp, ss. Prints a line to COM1 and
       powers off with status 3. Runs once, so its length does not matter. */
twin_fault_common:
    cli
    push rax
    mov rbx, rsp
    lea rsi, [rip + twin_fault_msg_vec]
    call twin_cpl0_puts
    mov rax, [rbx + 8]
    call twin_cpl0_puthex
    lea rsi, [rip + twin_fault_msg_err]
    call twin_cpl0_puts
    mov rax, [rbx + 16]
    call twin_cpl0_puthex
    lea rsi, [rip + twin_fault_msg_rip]
    call twin_cpl0_puts
    mov rax, [rbx + 24]
    call twin_cpl0_puthex
    lea rsi, [rip + twin_fault_msg_cs]
    call twin_cpl0_puts
    mov rax, [rbx + 32]
    call twin_cpl0_puthex
    lea rsi, [rip + twin_fault_msg_rsp]
    call twin_cpl0_puts
    mov rax, [rbx + 48]
    call twin_cpl0_puthex
    lea rsi, [rip + twin_fault_msg_cr2]
    call twin_cpl0_puts
    mov rax, cr2
    call twin_cpl0_puthex
    lea rsi, [rip + twin_fault_msg_rax]
    call twin_cpl0_puts
    mov rax, [rbx]
    call twin_cpl0_puthex
    lea rsi, [rip + twin_fault_msg_end]
    call twin_cpl0_puts
    mov dx, 0x501
    mov al, {exit_status}
    out dx, al
2:  cli
    hlt
    jmp 2b

    /* Print the NUL-terminated string at RSI. */
twin_cpl0_puts:
    movzx eax, byte ptr [rsi]
    test al, al
    jz 3f
    call twin_cpl0_putc
    inc rsi
    jmp twin_cpl0_puts
3:  ret

    /* Print AL to COM1 (bounded wait for THR empty). Clobbers ecx, edx, r8. */
twin_cpl0_putc:
    mov ecx, eax
    mov r8d, 1000
    mov dx, 0x3FD
4:  in al, dx
    test al, 0x20
    jnz 5f
    dec r8d
    jnz 4b
5:  mov eax, ecx
    mov dx, 0x3F8
    out dx, al
    ret

    /* Print RAX as 16 hex digits. Clobbers r9, r10, r11, eax, ecx, edx, r8. */
twin_cpl0_puthex:
    mov r9, rax
    mov r10d, 16
6:  rol r9, 4
    mov eax, r9d
    and eax, 0xF
    lea r11, [rip + twin_hex_digits]
    movzx eax, byte ptr [r11 + rax]
    call twin_cpl0_putc
    dec r10d
    jnz 6b
    ret

    .section .rodata.twin_cpl0, "a"
twin_hex_digits:
    .ascii "0123456789abcdef"
twin_fault_msg_vec:
    .asciz "\r\n*** twin-guest: CPU exception vector=0x"
twin_fault_msg_err:
    .asciz " error=0x"
twin_fault_msg_rip:
    .asciz " rip=0x"
twin_fault_msg_cs:
    .asciz " cs=0x"
twin_fault_msg_rsp:
    .asciz " rsp=0x"
twin_fault_msg_cr2:
    .asciz " cr2=0x"
twin_fault_msg_rax:
    .asciz " rax=0x"
twin_fault_msg_end:
    .asciz " -- powering off\r\n"
    .text
"#,
    exit_status = const EXIT_CPU_EXCEPTION,
);

/// Halt until the next interrupt, unless one arrived after `seen` (the value of the total
/// interrupt counter the caller last looked at) — this closes the lost-wakeup window.
#[inline(always)]
pub fn halt(seen: u64) {
    // SAFETY: `ud2` with RAX = HALT_MAGIC is the halt call of the boot contract. The #UD
    // is taken from CPL 3, so the CPU switches to the TSS's RSP0 stack (0x10000) before
    // pushing its frame: nothing is written below our RSP, the red zone included
    // (`nostack` holds). `twin_ud_handler` only compares RAX and RDI (inputs, unchanged),
    // adds 2 to the saved RIP to skip the 2-byte `ud2`, and `iretq` restores RFLAGS from
    // the frame, so no register or flag changes (`preserves_flags`). The interrupt
    // handlers that run while it halts write only TWIN_IRQ_COUNTS (atomics); the block is
    // not `nomem`, so the compiler reloads memory after it.
    unsafe {
        asm!("ud2", in("rax") HALT_MAGIC, in("rdi") seen, options(nostack, preserves_flags));
    }
}

/// Read the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` writes only EDX:EAX (the declared outputs), touches no memory, stack
    // or flags, and is allowed at CPL 3 because the VMM leaves CR4.TSD clear (boot
    // contract: CR4 = PAE|OSFXSR|OSXMMEXCPT).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Write a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: `out dx, al` reads only DX and AL and leaves flags and stack alone. At CPL 3
    // it is allowed by the all-zero TSS I/O permission bitmap the VMM provides (were it
    // refused, the #GP would reach the fault path and power off, not corrupt anything).
    // No port device of this VM reads or writes guest memory (COM1, the in-kernel PIC and
    // PIT, PCI conf1, the power-off port 0x501; there is no ISA DMA), so `nomem` is true.
    // A PCI configuration write may enable bus mastering, but the device then accesses
    // only the memory `virtio.rs` hands it through its virtqueues.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Read a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: `in al, dx` writes only AL (the declared output), no flags or stack; CPL-3
    // port reads are allowed by the TSS I/O bitmap, and no port device of this VM touches
    // guest memory on a read (COM1, PIC, PCI conf1), so `nomem` is true.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Write a dword to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: `out dx, eax` reads only DX and EAX, no flags or stack; allowed at CPL 3 by
    // the TSS I/O bitmap. As for `outb`, no port device of this VM accesses guest memory
    // (PCI conf1 at 0xCF8/0xCFC, used here, included), so `nomem` is true.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Read a dword from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: `in eax, dx` writes only EAX, no flags or stack; allowed at CPL 3 by the TSS
    // I/O bitmap. No port device of this VM touches guest memory on a read (PCI conf1 at
    // 0xCFC, used here, included), so `nomem` is true.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Stop the VM with `status` (power-off port 0x501). Never returns.
pub fn power_off(status: u8) -> ! {
    loop {
        outb(0x501, status);
        // If the VMM ignored the write, wait without burning the CPU.
        halt(irq_count(IRQ_TOTAL));
    }
}

/// Full memory barrier (`mfence`): orders our stores before later loads, as virtio needs
/// before checking whether the other side wants a notification.
#[inline(always)]
pub fn mb() {
    core::sync::atomic::fence(Ordering::SeqCst);
}
