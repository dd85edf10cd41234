//! Pages reported dirty whose contents the backup already holds are not sent again.
//!
//! The VMM leaves *hot* pages writable (`twin_vmm::hot`): they stay in KVM's log and are
//! reported — and copied — in every epoch of their hold, whether the guest wrote them in
//! that epoch or not. A server with many connections has a few hundred such pages (socket
//! buffers, connection state) of which an epoch touches only some, and sending the others
//! again costs the replication thread (encode, CRC, send) and the backup (decode, apply)
//! CPU that a small machine takes from the guest: at redis-benchmark -c 64 a ~640 KB epoch
//! 420 times a second.
//!
//! [`LastSent`] remembers the contents of every page of the previous epoch (sent, or
//! skipped because it was unchanged — in both cases exactly what the backup's replica holds
//! once it applies that epoch, since epochs apply in order and a failed one ends the
//! session). A page of this epoch equal to its remembered copy is skipped. Only the previous
//! epoch's pages are remembered (a page not reported in an epoch is forgotten and sent in
//! full when next reported), which bounds the memory to what epochs report. A new session
//! starts from an empty [`LastSent`] (the resync sends everything).
//!
//! Remembering costs a page copy on the replication thread, outside the pause; an epoch
//! of more than [`MAX_PAGES`] pages (a memory-bound guest, whose pages are rarely
//! unchanged) forgets everything instead.

use std::collections::HashMap;

use twin_vmm::memory::PAGE_SIZE;

/// Most pages remembered (32 MiB).
pub const MAX_PAGES: usize = 8192;

type Page = Box<[u8; PAGE_SIZE]>;

/// The contents of the previous epoch's pages, as the backup holds them.
#[derive(Default)]
pub struct LastSent {
    prev: HashMap<u64, Page>,
    /// Buffers of forgotten pages, reused.
    pool: Vec<Page>,
    /// Pages skipped so far.
    pub skipped: u64,
}

impl LastSent {
    /// Given this epoch's dirty pages (`index`, contents) in ascending order, returns the
    /// positions (in `pages`) of those to send, and remembers every one of them.
    pub fn filter(&mut self, pages: &[(u64, &[u8])]) -> Vec<usize> {
        if pages.len() > MAX_PAGES {
            self.forget();
            return (0..pages.len()).collect();
        }
        let mut next = HashMap::with_capacity(pages.len());
        let mut send = Vec::with_capacity(pages.len());
        for (i, &(index, data)) in pages.iter().enumerate() {
            match self.prev.remove(&index) {
                Some(copy) if copy[..] == *data => {
                    self.skipped += 1;
                    next.insert(index, copy);
                }
                old => {
                    let mut copy = old
                        .or_else(|| self.pool.pop())
                        .unwrap_or_else(|| Box::new([0; PAGE_SIZE]));
                    copy.copy_from_slice(data);
                    next.insert(index, copy);
                    send.push(i);
                }
            }
        }
        let stale = std::mem::replace(&mut self.prev, next);
        self.pool.extend(stale.into_values());
        self.pool
            .truncate(MAX_PAGES.saturating_sub(self.prev.len()));
        send
    }

    /// Forgets every page (the next epoch sends everything it reports).
    pub fn forget(&mut self) {
        let stale = std::mem::take(&mut self.prev);
        self.pool.extend(stale.into_values());
        self.pool.truncate(MAX_PAGES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    #[test]
    fn an_unchanged_page_of_the_previous_epoch_is_skipped() {
        let mut l = LastSent::default();
        let (a, b) = (page(1), page(2));
        assert_eq!(
            l.filter(&[(3, &a), (9, &b)]),
            [0, 1],
            "first epoch: everything"
        );
        let b2 = page(7);
        assert_eq!(l.filter(&[(3, &a), (9, &b2)]), [1], "page 3 unchanged");
        assert_eq!(l.skipped, 1);
        // Skipped in the previous epoch is still what the backup holds.
        assert_eq!(l.filter(&[(3, &a)]), Vec::<usize>::new());
        assert_eq!(l.skipped, 2);
    }

    #[test]
    fn a_page_missing_from_an_epoch_is_sent_again() {
        let mut l = LastSent::default();
        let a = page(1);
        l.filter(&[(3, &a)]);
        l.filter(&[(4, &a)]);
        // 3 was not reported in between: only the previous epoch's pages are remembered.
        assert_eq!(l.filter(&[(3, &a)]), [0]);
    }

    #[test]
    fn a_page_changed_in_one_byte_is_sent() {
        let mut l = LastSent::default();
        let a = page(1);
        l.filter(&[(5, &a)]);
        let mut a2 = a.clone();
        a2[PAGE_SIZE - 1] = 0;
        assert_eq!(l.filter(&[(5, &a2)]), [0]);
        assert_eq!(l.filter(&[(5, &a2)]), Vec::<usize>::new());
        assert_eq!(
            l.filter(&[(5, &a)]),
            [0],
            "compared with the last copy sent"
        );
    }

    #[test]
    fn a_huge_epoch_forgets_everything() {
        let mut l = LastSent::default();
        let a = page(1);
        l.filter(&[(1, &a)]);
        let many: Vec<(u64, &[u8])> = (0..=MAX_PAGES as u64).map(|i| (i, &a[..])).collect();
        assert_eq!(l.filter(&many).len(), many.len());
        assert_eq!(l.filter(&[(1, &a)]), [0], "forgotten");
    }

    #[test]
    fn after_forget_everything_is_sent() {
        let mut l = LastSent::default();
        let a = page(1);
        l.filter(&[(1, &a)]);
        l.forget();
        assert_eq!(l.filter(&[(1, &a)]), [0]);
    }
}
