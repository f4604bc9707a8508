//! virtio-vsock with the host side on a unix socket (Firecracker's hybrid model).
//!
//! - [`packet`]: the 44-byte header.
//! - [`connection`]: one stream's state machine and credit-based flow control.
//! - [`muxer`]: host sockets <-> guest queues, and the `CONNECT <port>` handshake.
//!
//! Threads: queue notifications are handled on the vCPU thread that wrote QueueNotify; host
//! socket readiness on a dedicated event thread (epoll). Both lock the same backend.

pub mod connection;
pub mod muxer;
pub mod packet;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use virtio_queue::Queue;
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;

pub use muxer::{VsockBackend, VsockError};

use crate::devices::virtio::{
    ActivateError, IrqTrigger, TYPE_VSOCK, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes,
};
use crate::memory::GuestMemory;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;

/// The virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    queue_sizes: [u16; 3],
    backend: Arc<Mutex<VsockBackend>>,
    /// Wakes the event thread when a snapshot pause ends (or the device goes away).
    pause_cv: Arc<Condvar>,
    /// Set when the device is dropped: the event thread ends, paused or not.
    stopping: Arc<AtomicBool>,
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock(b: &Mutex<VsockBackend>) -> MutexGuard<'_, VsockBackend> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vsock {
    /// A device for guest `guest_cid`, listening for host clients on `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let epoll = Arc::new(Epoll::new().map_err(VsockError::Epoll)?);
        let mut backend = VsockBackend::new(guest_cid, uds_path, epoll.clone())?;
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VsockError::Epoll)?,
        );
        backend
            .add_wakeup_fd(stop.as_raw_fd())
            .map_err(VsockError::Epoll)?;
        let backend = Arc::new(Mutex::new(backend));
        let pause_cv = Arc::new(Condvar::new());
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let backend = backend.clone();
            let stop = stop.clone();
            let cv = pause_cv.clone();
            let stopping = stopping.clone();
            std::thread::Builder::new()
                .name("fissile-vsock".into())
                .spawn(move || event_loop(&epoll, &backend, &cv, &stop, &stopping))
                .map_err(VsockError::Thread)?
        };
        Ok(Self {
            guest_cid,
            queue_sizes: [QUEUE_SIZE; 3],
            backend,
            pause_cv,
            stopping,
            stop,
            thread: Some(thread),
        })
    }

    /// Sends a transport-reset event to the guest and drops every connection.
    pub fn send_transport_reset(&self) -> bool {
        lock(&self.backend).send_transport_reset()
    }
}

fn event_loop(
    epoll: &Epoll,
    backend: &Mutex<VsockBackend>,
    pause_cv: &Condvar,
    stop: &EventFd,
    stopping: &AtomicBool,
) {
    crate::seccomp::enter(crate::seccomp::ThreadClass::Vsock);
    let mut events = vec![EpollEvent::default(); 64];
    let mut wait = muxer::TICK;
    loop {
        // A timeout, so housekeeping (a transport-reset wait) runs without guest activity;
        // long when no timer is armed (a timer armed meanwhile wakes the wait).
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        let n = match epoll.wait(ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "vsock: epoll_wait failed; vsock thread exits");
                return;
            }
        };
        if stop.read().is_ok() || stopping.load(Ordering::Acquire) {
            return;
        }
        let mut b = lock(backend);
        b.woke();
        if b.is_paused() {
            // A snapshot is being taken: leave host data in the sockets and sleep until the
            // pause ends or the device goes away (a VM stopped while paused); the wait
            // releases the lock. The events already taken are handled after the pause:
            // connection sockets are edge-triggered, so epoll does not report them again,
            // and data dropped here would wait in its socket until the host wrote more.
            // (An event for a descriptor closed and reused meanwhile is harmless: the
            // handlers only try non-blocking reads, accepts and writes.)
            b = pause_cv
                .wait_while(b, |b| b.is_paused() && !stopping.load(Ordering::Acquire))
                .unwrap_or_else(|p| p.into_inner());
            if stopping.load(Ordering::Acquire) {
                return;
            }
        }
        // The events first: a handshake line or a guest answer that came during a pause
        // must count before the timers look at it.
        for ev in &events[..n] {
            b.handle_event(ev.fd(), ev.event_set());
        }
        b.tick();
        wait = b.next_wait();
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        {
            // Under the lock the paused thread waits with: it either has not checked the
            // flag yet or is waiting and gets this notification.
            let _b = lock(&self.backend);
            self.pause_cv.notify_all();
        }
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: queues.len(),
            });
        }
        lock(&self.backend).activate(mem, queues, irq);
        Ok(())
    }

    fn queue_notify(&mut self, index: u32) {
        lock(&self.backend).notify(index as usize);
    }

    fn reset(&mut self) {
        lock(&self.backend).reset();
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        lock(&self.backend).queue_states()
    }

    fn quiesce(&mut self, paused: bool) {
        lock(&self.backend).set_paused(paused);
        self.pause_cv.notify_all();
    }

    fn debug_state(&self) -> String {
        lock(&self.backend).debug_state()
    }

    fn restored(&mut self) {
        // Host connections cannot survive a snapshot: the guest is told to drop its side
        // (virtio 1.2 5.10.6.5) and host clients reconnect. The event is delivered when the
        // VM resumes, so a restored VM that is still paused holds exactly the snapshot.
        lock(&self.backend).reset_on_resume();
    }
}

#[cfg(test)]
mod tests;
