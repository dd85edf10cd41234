//! Real-time scheduling for the threads whose timeliness is the product: the primary's
//! checkpoint/heartbeat thread and the backup's receive thread. Starved by ordinary load
//! for longer than the heartbeat timeout, a primary looks dead and is taken over (safely,
//! since it then fences itself, but needlessly). Corosync and similar HA stacks run their
//! heartbeat paths real-time for the same reason.

/// Low SCHED_FIFO priority: above every normal thread, below kernel and IRQ threads.
pub const PRIORITY: i32 = 10;

/// Gives the calling thread SCHED_FIFO at [`PRIORITY`]. Without the privilege for it the
/// thread keeps its normal policy and the caller is told why.
pub fn elevate_current_thread() -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: PRIORITY,
    };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is the calling
    // thread; the return value is checked.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// [`elevate_current_thread`], logging the outcome for `role`.
pub fn elevate_or_warn(role: &str) {
    match elevate_current_thread() {
        Ok(()) => tracing::debug!(thread = role, priority = PRIORITY, "real-time scheduling"),
        Err(e) => tracing::warn!(
            thread = role,
            "cannot use real-time scheduling ({e}); under load, heartbeats may be late"
        ),
    }
}
