use super::*;
use std::sync::Arc;
use twin_vmm::lazy::{Loader, PageSource, RestoreMode};
use twin_vmm::memory::Memory;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("twin-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn page(v: u8) -> Vec<u8> {
    let mut p = vec![v; PAGE_SIZE];
    p[0] = v.wrapping_add(1);
    p
}

fn state(epoch: u64) -> StoreState {
    StoreState {
        epoch,
        vm_id: [7; 16],
        generation: 3,
        mac: [2, 0, 0, 0, 0, 1],
        machine: vec![1, 2, 3],
    }
}

#[test]
fn committed_pages_restore_lazily_and_the_working_set_is_newest_first() {
    let dir = tmp("restore");
    let s = Store::create(&dir, 4 << 20, None).unwrap();
    s.write_page(1, &page(1), 0).unwrap();
    s.write_page(2, &page(2), 0).unwrap();
    s.write_page(3, &vec![0; PAGE_SIZE], 0).unwrap();
    s.begin(1);
    s.write_page(2, &page(22), 1).unwrap();
    s.write_page(9, &page(9), 1).unwrap();
    s.commit(&state(1)).unwrap();
    s.begin(2);
    s.write_page(5, &page(5), 2).unwrap();
    s.zero_pages(&[1]).unwrap();
    s.commit(&state(2)).unwrap();
    let src = s.source();
    assert_eq!(src.working_set(), vec![5, 2, 9]);
    let mut buf = vec![0u8; PAGE_SIZE];
    s.read_page(2, &mut buf).unwrap();
    assert_eq!(buf, page(22));
    drop(s);

    let (src, st) = open_committed(&dir).unwrap();
    assert_eq!(st, state(2));
    let mem = Memory::new(4 << 20).unwrap();
    let l = Loader::start(&mem, Arc::new(src), RestoreMode::Ws).unwrap();
    l.wait().unwrap();
    for (p, want) in [
        (1, vec![0; PAGE_SIZE]),
        (2, page(22)),
        (5, page(5)),
        (9, page(9)),
    ] {
        mem.read_page(p, &mut buf).unwrap();
        assert_eq!(buf, want, "page {p}");
    }
    assert_eq!(l.progress().bytes_read, 3 * PAGE_SIZE as u64);
}

#[test]
fn a_torn_store_and_a_damaged_page_are_refused() {
    let dir = tmp("torn");
    let s = Store::create(&dir, 2 << 20, None).unwrap();
    assert!(matches!(
        open_committed(&dir),
        Err(StoreError::NothingCommitted(_))
    ));
    s.begin(1);
    s.write_page(4, &page(4), 1).unwrap();
    s.commit(&state(1)).unwrap();
    s.begin(2);
    s.write_page(4, &page(44), 2).unwrap();
    let e = open_committed(&dir).err().unwrap().to_string();
    assert!(e.contains("torn") && e.contains("epoch 2"), "{e}");
    s.commit(&state(2)).unwrap();
    drop(s);
    // A bit flipped on disk.
    let f = File::options()
        .write(true)
        .open(dir.join(MEMORY_FILE))
        .unwrap();
    f.write_all_at(&[0xff], 4 * PAGE_SIZE as u64 + 100).unwrap();
    let (src, _) = open_committed(&dir).unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    let e = src.read(4, &mut buf).unwrap_err().to_string();
    assert!(e.contains("page 4") && e.contains("damaged"), "{e}");
    // Not a store at all.
    std::fs::write(dir.join(INDEX_FILE), b"junk").unwrap();
    let e = open_committed(&dir).err().unwrap().to_string();
    assert!(e.contains("not a replica store"), "{e}");
}

#[test]
fn out_of_range_pages_are_errors() {
    let dir = tmp("range");
    let s = Store::create(&dir, 2 << 20, None).unwrap();
    assert!(matches!(
        s.write_page(512, &page(1), 1),
        Err(StoreError::Range { .. })
    ));
    assert!(matches!(
        s.zero_pages(&[0, 512]),
        Err(StoreError::Range { .. })
    ));
    assert!(matches!(
        s.write_page(0, &[1; 10], 1),
        Err(StoreError::PageSize(10))
    ));
}

#[test]
fn the_budget_drops_old_pages_from_the_cache() {
    let dir = tmp("budget");
    let s = Store::create(&dir, 64 << 20, Some(4 << 20)).unwrap();
    let mut e = 0;
    for chunk in 0..16u64 {
        e += 1;
        s.begin(e);
        for p in chunk * 1024..(chunk + 1) * 1024 {
            s.write_page(p, &page(p as u8), e).unwrap();
        }
        s.commit(&state(e)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let resident = s.resident_bytes();
    // 64 MiB written; the trimmer keeps about half the budget's worth of recent pages.
    assert!(resident <= 16 << 20, "{} MiB cached", resident >> 20);
}
