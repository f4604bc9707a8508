use std::io::Write;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::test_utils::{TestQueue, test_irq, test_memory};
use crate::memory::GuestMemory;

/// Where the test queue lives, and scratch areas for headers, data and status bytes.
const QUEUE_BASE: u64 = 0x10_0000;
const HEADER: u64 = 0x20_0000;
const DATA: u64 = 0x30_0000;
const STATUS: u64 = 0x40_0000;
/// Test disk: 64 sectors, each filled with its sector number.
const DISK_SECTORS: u64 = 64;

struct Rig {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    mem: GuestMemory,
    tq: TestQueue,
    block: Block,
}

fn rig(read_only: bool) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let mut f = std::fs::File::create(&path).unwrap();
    for s in 0..DISK_SECTORS {
        f.write_all(&[s as u8; 512]).unwrap();
    }
    drop(f);
    let mem = test_memory();
    let tq = TestQueue::new(&mem, QUEUE_BASE, 16);
    let mut block = Block::new(&path, read_only, "fissile-test-disk").unwrap();
    block
        .activate(mem.clone(), vec![tq.queue()], test_irq())
        .unwrap();
    Rig {
        _dir: dir,
        path,
        mem,
        tq,
        block,
    }
}

impl Rig {
    fn header(&self, ty: u32, sector: u64) {
        self.mem.write_obj(ty, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        self.mem
            .write_obj(sector, GuestAddress(HEADER + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Submits a chain and processes it; returns (status byte, used length).
    fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> (u8, u32) {
        let head = self.tq.add_chain(&self.mem, bufs);
        self.tq.publish(&self.mem, head);
        let before = self.tq.used_idx(&self.mem);
        self.block.process_queue();
        assert_eq!(
            self.tq.used_idx(&self.mem),
            before.wrapping_add(1),
            "one used entry per request"
        );
        let (id, len) = self.tq.used_entry(&self.mem, before);
        assert_eq!(id, u32::from(head));
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }
}

#[test]
fn read_returns_disk_contents() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_IN, 3);

    let (status, len) = r.submit(&[(HEADER, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);

    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(len, 1024 + 1);
    let mut buf = [0u8; 1024];
    r.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 3));
    assert!(buf[512..].iter().all(|&b| b == 4));
}

#[test]
fn write_then_flush_reaches_the_file() {
    let mut r = rig(false);
    r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    r.header(VIRTIO_BLK_T_OUT, 10);

    let (status, len) = r.submit(&[(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    let (status, _) = r.submit(&[(HEADER, 16, false), (STATUS, 1, true)]);

    assert_eq!(status, VIRTIO_BLK_S_OK);
    let content = std::fs::read(&r.path).unwrap();
    assert!(content[10 * 512..11 * 512].iter().all(|&b| b == 0xab));
    assert!(
        content[11 * 512..12 * 512].iter().all(|&b| b == 11),
        "neighbour untouched"
    );
}

#[test]
fn write_to_read_only_disk_is_ioerr() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_OUT, 0);

    let (status, _) = r.submit(&[(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, true)]);

    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    assert!(
        std::fs::read(&r.path).unwrap()[..512]
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn get_id_returns_the_id_string() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_GET_ID, 0);

    let (status, len) = r.submit(&[(HEADER, 16, false), (DATA, 20, true), (STATUS, 1, true)]);

    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..17], b"fissile-test-disk");
}

#[test]
fn unknown_request_type_is_unsupported() {
    let mut r = rig(true);
    r.header(99, 0);

    let (status, _) = r.submit(&[(HEADER, 16, false), (STATUS, 1, true)]);

    assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn config_space_reports_capacity_and_read_only_feature() {
    let r = rig(true);
    let mut cap = [0u8; 8];

    r.block.read_config(0, &mut cap);

    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    assert_ne!(r.block.avail_features() & VIRTIO_BLK_F_RO, 0);
    let mut past_end = [0xffu8; 4];
    r.block.read_config(4096, &mut past_end);
    assert_eq!(past_end, [0; 4]);
}

#[test]
fn data_buffer_outside_guest_ram_is_rejected_without_panic() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_IN, 0);

    // 1 TiB is far past the 16 MiB of test memory: the whole chain is refused.
    let (_, len) = r.submit(&[(HEADER, 16, false), (1 << 40, 512, true), (STATUS, 1, true)]);

    assert_eq!(len, 0);
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        0xff,
        "status untouched"
    );
}

#[test]
fn buffer_straddling_the_end_of_ram_is_rejected() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_IN, 0);
    let last_page = (16 << 20) - 256;

    let (_, len) = r.submit(&[
        (HEADER, 16, false),
        (last_page, 512, true),
        (STATUS, 1, true),
    ]);

    assert_eq!(len, 0);
}

#[test]
fn read_into_device_readable_buffer_is_ioerr() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_IN, 0);

    let (status, len) = r.submit(&[(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, true)]);

    assert_eq!((status, len), (VIRTIO_BLK_S_IOERR, 1));
}

#[test]
fn write_only_header_is_ioerr() {
    let mut r = rig(false);
    r.header(VIRTIO_BLK_T_IN, 0);

    let (status, _) = r.submit(&[(HEADER, 16, true), (DATA, 512, true), (STATUS, 1, true)]);

    assert_eq!(status, VIRTIO_BLK_S_IOERR);
}

#[test]
fn read_only_status_descriptor_is_dropped() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_IN, 0);

    let (status, len) = r.submit(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, false)]);

    assert_eq!((status, len), (0xff, 0));
}

#[test]
fn oversize_length_past_end_of_disk_is_ioerr() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1);

    let (status, _) = r.submit(&[(HEADER, 16, false), (DATA, 4096, true), (STATUS, 1, true)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);

    r.header(VIRTIO_BLK_T_IN, u64::MAX / 256);
    let (status, _) = r.submit(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR, "sector * 512 overflow");
}

#[test]
fn huge_descriptor_length_is_rejected() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_IN, 0);

    let (_, len) = r.submit(&[
        (HEADER, 16, false),
        (DATA, u32::MAX, true),
        (STATUS, 1, true),
    ]);

    assert_eq!(len, 0);
}

#[test]
fn unaligned_length_is_ioerr() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_IN, 0);

    let (status, _) = r.submit(&[(HEADER, 16, false), (DATA, 100, true), (STATUS, 1, true)]);

    assert_eq!(status, VIRTIO_BLK_S_IOERR);
}

#[test]
fn descriptor_loop_is_dropped_and_the_queue_keeps_working() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ...
    r.tq.write_desc(&r.mem, 0, HEADER, 16, 1, 1);
    r.tq.write_desc(&r.mem, 1, DATA, 512, 1 | 2, 0);
    r.tq.publish(&r.mem, 0);

    r.block.process_queue();

    assert_eq!(r.tq.used_idx(&r.mem), 1);
    assert_eq!(r.tq.used_entry(&r.mem, 0), (0, 0));
    // A well-formed request afterwards still works.
    r.tq.skip(2);
    let (status, _) = r.submit(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn chain_longer_than_the_queue_is_dropped() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_IN, 0);
    // Every descriptor of the 16-entry table chains to the next, the last back to 0.
    for i in 0..16u16 {
        r.tq.write_desc(
            &r.mem,
            i,
            DATA + 512 * u64::from(i),
            512,
            1 | 2,
            (i + 1) % 16,
        );
    }
    r.tq.publish(&r.mem, 0);

    r.block.process_queue();

    assert_eq!(r.tq.used_entry(&r.mem, 0), (0, 0));
}

#[test]
fn next_index_out_of_range_is_dropped() {
    let mut r = rig(true);
    r.header(VIRTIO_BLK_T_IN, 0);
    r.tq.write_desc(&r.mem, 0, HEADER, 16, 1, 500);
    r.tq.publish(&r.mem, 0);

    r.block.process_queue();

    assert_eq!(r.tq.used_entry(&r.mem, 0), (0, 0));
}

#[test]
fn head_index_out_of_range_is_dropped() {
    let mut r = rig(true);
    r.tq.publish(&r.mem, 9999);

    r.block.process_queue();

    // No used entry can name a head outside the table; the next request still completes.
    assert_eq!(r.tq.used_idx(&r.mem), 0);
    r.header(VIRTIO_BLK_T_IN, 0);
    let (status, _) = r.submit(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}
