//! The VM-state half of a snapshot (memory is the other half, in snapshotd): format,
//! contents and validation.
//!
//! # Format
//! ```text
//! +----------+-------------------+----------------+-------------------+----------------+
//! | magic    | format version    | payload length | payload           | blake3         |
//! | FSSLVMST | u32 little-endian | u64 LE         | postcard(state)   | of all before  |
//! +----------+-------------------+----------------+-------------------+----------------+
//! ```
//! The format version is the snapshot format's own, not the binary's: any change to
//! [`MicrovmState`] bumps it (no per-field versioning). The previous version still decodes
//! (format 2 lacks only the TSC rate). Decoding checks the magic, the
//! version, the length (capped at [`MAX_STATE_BYTES`] before anything is allocated) and the
//! checksum, then [`MicrovmState::validate`] checks the contents as untrusted input.
//!
//! # Components
//! Device state implements [`Persist`] (required for every stateful device: a new device
//! cannot be added without deciding what it saves); capture and apply
//! (`crate::lifecycle::state`) go through it and nothing else. The KVM-held state (vCPUs, irqchip,
//! PIT, clock) is captured with ioctls that can fail, so it lives in
//! [`crate::vstate::persist`] with its own capture/apply.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::{MAX_VCPUS, MachineConfig};
use crate::devices::legacy::serial::SerialSaved;
use crate::devices::virtio::persist::MmioTransportState;
use crate::vstate::persist::{KvmStateError, VcpuState, VmState};

/// First bytes of every VM-state blob.
pub const STATE_MAGIC: &[u8; 8] = b"FSSLVMST";
/// Version of the VM-state format.
pub const STATE_FORMAT_VERSION: u32 = 3;
/// The format before the TSC rate was saved: decoded into a state without one.
const STATE_FORMAT_V2: u32 = 2;
/// TSC rates accepted from a state blob, kHz (1 MHz to 20 GHz).
const TSC_KHZ_RANGE: std::ops::RangeInclusive<u32> = 1_000..=20_000_000;
/// Largest VM-state blob accepted.
pub const MAX_STATE_BYTES: u64 = 16 << 20;
/// Name of the VM-state blob in snapshotd.
pub const STATE_BLOB: &str = "vmstate";
const HEADER_LEN: usize = 8 + 4 + 8;
const CHECKSUM_LEN: usize = 32;

/// A stateful component that snapshots into plain serde data.
pub trait Persist {
    /// What it saves.
    type State: Serialize + DeserializeOwned + std::fmt::Debug + PartialEq;
    /// Why a restore can fail.
    type Error: std::error::Error;
    /// Captures the state (plain reads; the VM is paused).
    fn save(&self) -> Self::State;
    /// Puts the component into `state`, validating it as untrusted input. Works on a
    /// component freshly built from configuration (restore) and on a live one (merge).
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// The VM state of a snapshot. (Two states are equal when their encodings are: some KVM
/// structs have no `PartialEq`.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The machine.
    pub machine: MachineConfig,
    /// irqchip, PIT, clock.
    pub vm: VmState,
    /// One per vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialSaved,
    /// The virtio-mmio transports in slot order.
    pub mmio: Vec<MmioTransportState>,
    /// The vCPUs' TSC rate in kHz (`None`: unknown, format 2 or a host that cannot say). A
    /// guest on the TSC-deadline timer programs its timers in TSC cycles at the rate it
    /// measured at boot, so a restore sets this rate where the host's differs.
    pub tsc_khz: Option<u32>,
}

/// Format 2 of [`MicrovmState`]: the same without the TSC rate.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct MicrovmStateV2 {
    machine: MachineConfig,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    serial: SerialSaved,
    mmio: Vec<MmioTransportState>,
}

impl From<MicrovmStateV2> for MicrovmState {
    fn from(v: MicrovmStateV2) -> MicrovmState {
        MicrovmState {
            machine: v.machine,
            vm: v.vm,
            vcpus: v.vcpus,
            serial: v.serial,
            mmio: v.mmio,
            tsc_khz: None,
        }
    }
}

/// Decoding or validating a VM-state blob failed.
#[derive(Debug, thiserror::Error)]
pub enum StateFormatError {
    /// Too short to hold a header and checksum.
    #[error("VM state is truncated ({0} bytes)")]
    Truncated(usize),
    /// Not a Fissile VM state.
    #[error("not a Fissile VM state (bad magic)")]
    Magic,
    /// Another format version.
    #[error(
        "VM state format {found} is not supported (this VMM reads {STATE_FORMAT_V2} and \
         {STATE_FORMAT_VERSION})"
    )]
    Version {
        /// Version in the blob.
        found: u32,
    },
    /// Length field and blob disagree, or the blob is too large.
    #[error(
        "VM state length {declared} does not match the blob ({actual} bytes) or exceeds {MAX_STATE_BYTES}"
    )]
    Length {
        /// Declared payload length.
        declared: u64,
        /// Actual blob length.
        actual: usize,
    },
    /// The checksum does not match: corrupt.
    #[error("VM state checksum mismatch (corrupt)")]
    Checksum,
    /// The payload does not decode.
    #[error("VM state payload does not decode")]
    Decode(#[source] postcard::Error),
    /// Encoding failed.
    #[error("encoding VM state")]
    Encode(#[source] postcard::Error),
    /// The contents are invalid.
    #[error("invalid VM state: {0}")]
    Invalid(String),
    /// A vCPU state is invalid.
    #[error("invalid vCPU state")]
    Vcpu(#[source] KvmStateError),
}

impl MicrovmState {
    /// Encodes into the blob format.
    pub fn encode(&self) -> Result<Vec<u8>, StateFormatError> {
        let payload = postcard::to_allocvec(self).map_err(StateFormatError::Encode)?;
        Ok(seal(STATE_FORMAT_VERSION, &payload))
    }

    /// Decodes and validates a blob.
    pub fn decode(blob: &[u8]) -> Result<MicrovmState, StateFormatError> {
        if blob.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(StateFormatError::Truncated(blob.len()));
        }
        if &blob[..8] != STATE_MAGIC {
            return Err(StateFormatError::Magic);
        }
        let version = u32::from_le_bytes([blob[8], blob[9], blob[10], blob[11]]);
        if version != STATE_FORMAT_VERSION && version != STATE_FORMAT_V2 {
            return Err(StateFormatError::Version { found: version });
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&blob[12..20]);
        let declared = u64::from_le_bytes(len);
        let length_error = StateFormatError::Length {
            declared,
            actual: blob.len(),
        };
        if declared > MAX_STATE_BYTES {
            return Err(length_error);
        }
        let end = HEADER_LEN + declared as usize;
        if blob.len() != end + CHECKSUM_LEN {
            return Err(length_error);
        }
        if blake3::hash(&blob[..end]).as_bytes() != &blob[end..] {
            return Err(StateFormatError::Checksum);
        }
        let payload = &blob[HEADER_LEN..end];
        let state: MicrovmState = if version == STATE_FORMAT_V2 {
            postcard::from_bytes::<MicrovmStateV2>(payload)
                .map_err(StateFormatError::Decode)?
                .into()
        } else {
            postcard::from_bytes(payload).map_err(StateFormatError::Decode)?
        };
        state.validate()?;
        Ok(state)
    }

    /// Checks the shape: vCPU count, memory size, device count.
    pub fn validate(&self) -> Result<(), StateFormatError> {
        let m = &self.machine;
        if m.vcpus == 0 || m.vcpus > MAX_VCPUS || self.vcpus.len() != usize::from(m.vcpus) {
            return Err(StateFormatError::Invalid(format!(
                "{} vCPU states for a machine of {} vCPUs (1..={MAX_VCPUS})",
                self.vcpus.len(),
                m.vcpus
            )));
        }
        if m.mem_size < (64 << 20) || m.mem_size > (1 << 40) || !m.mem_size.is_multiple_of(4096) {
            return Err(StateFormatError::Invalid(format!(
                "memory size {} bytes",
                m.mem_size
            )));
        }
        let expected = 1
            + usize::from(m.guest_cid.is_some())
            + usize::from(m.rng)
            + usize::from(m.net_mac.is_some());
        if self.mmio.len() != expected {
            return Err(StateFormatError::Invalid(format!(
                "{} virtio devices, the machine has {expected}",
                self.mmio.len()
            )));
        }
        if m.guest_cid.is_some_and(|c| c < 3) {
            return Err(StateFormatError::Invalid("reserved guest CID".into()));
        }
        if let Some(khz) = self.tsc_khz.filter(|k| !TSC_KHZ_RANGE.contains(k)) {
            return Err(StateFormatError::Invalid(format!("TSC rate {khz} kHz")));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            v.validate(i).map_err(StateFormatError::Vcpu)?;
        }
        Ok(())
    }
}

/// The blob of `payload` in format `version`: header, payload, checksum (what
/// [`MicrovmState::encode`] writes; the fuzzer seals arbitrary payloads with it too).
pub fn seal(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::persist::XSAVE_WORDS;

    fn state() -> MicrovmState {
        let vcpu = VcpuState {
            cpuid: vec![kvm_bindings::kvm_cpuid_entry2::default()],
            msrs: vec![kvm_bindings::kvm_msr_entry {
                index: 0x10,
                data: 77,
                ..Default::default()
            }],
            regs: kvm_bindings::kvm_regs {
                rip: 0x1234,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: vec![0; XSAVE_WORDS],
            xcrs: None,
            debugregs: Default::default(),
            lapic: Default::default(),
            mp_state: Default::default(),
            events: Default::default(),
        };
        MicrovmState {
            machine: MachineConfig {
                mem_size: 256 << 20,
                vcpus: 1,
                rootfs: "/r".into(),
                guest_cid: Some(3),
                rng: true,
                net_mac: Some([6, 0, 0xac, 0x10, 0, 2]),
                cmdline: "console=ttyS0".into(),
            },
            vm: VmState {
                irqchips: (0..3)
                    .map(|chip_id| kvm_bindings::kvm_irqchip {
                        chip_id,
                        ..Default::default()
                    })
                    .collect(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![vcpu],
            serial: crate::devices::legacy::serial::SerialSaved {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: vec![],
            },
            mmio: (0..4)
                .map(|i| MmioTransportState {
                    device_type: [2, 19, 4, 1][i],
                    device_features_sel: 0,
                    driver_features_sel: 0,
                    acked_features: 0,
                    queue_sel: 0,
                    status: 0,
                    config_generation: 0,
                    interrupt_status: 0,
                    activated: false,
                    queues: vec![],
                })
                .collect(),
            tsc_khz: Some(2_994_374),
        }
    }

    #[test]
    fn state_round_trips_through_the_format() {
        let blob = state().encode().unwrap();
        let back = MicrovmState::decode(&blob).unwrap();
        assert_eq!(back.encode().unwrap(), blob);
        assert_eq!(back.vcpus[0].regs.rip, 0x1234);
        assert_eq!(back.tsc_khz, Some(2_994_374));
    }

    #[test]
    fn a_format_2_state_decodes_without_a_tsc_rate() {
        let s = state();
        let v2 = MicrovmStateV2 {
            machine: s.machine.clone(),
            vm: s.vm.clone(),
            vcpus: s.vcpus.clone(),
            serial: s.serial.clone(),
            mmio: s.mmio.clone(),
        };
        let blob = seal(2, &postcard::to_allocvec(&v2).unwrap());
        let back = MicrovmState::decode(&blob).unwrap();
        assert_eq!(back.tsc_khz, None);
        assert_eq!(back.vcpus[0].regs.rip, 0x1234);
        // Re-encoded, it is format 3.
        let again = back.encode().unwrap();
        assert_eq!(again[8..12], STATE_FORMAT_VERSION.to_le_bytes());
    }

    #[test]
    fn corrupt_truncated_or_foreign_blobs_are_refused() {
        let blob = state().encode().unwrap();
        let mut flipped = blob.clone();
        flipped[40] ^= 1;
        assert!(matches!(
            MicrovmState::decode(&flipped),
            Err(StateFormatError::Checksum)
        ));
        assert!(matches!(
            MicrovmState::decode(&blob[..blob.len() - 1]),
            Err(StateFormatError::Length { .. })
        ));
        assert!(matches!(
            MicrovmState::decode(&blob[..10]),
            Err(StateFormatError::Truncated(_))
        ));
        let mut magic = blob.clone();
        magic[0] = b'X';
        assert!(matches!(
            MicrovmState::decode(&magic),
            Err(StateFormatError::Magic)
        ));
        let mut version = blob.clone();
        version[8] = 9;
        assert!(matches!(
            MicrovmState::decode(&version),
            Err(StateFormatError::Version { found: 9 })
        ));
        let mut huge = blob.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            MicrovmState::decode(&huge),
            Err(StateFormatError::Length { .. })
        ));
    }

    #[test]
    fn a_well_formed_blob_with_an_impossible_machine_is_refused() {
        let mut s = state();
        s.machine.vcpus = 2; // one vCPU state for two vCPUs
        let err = MicrovmState::decode(&s.encode().unwrap()).unwrap_err();
        assert!(matches!(err, StateFormatError::Invalid(_)), "{err}");
        let mut s = state();
        s.mmio.pop();
        assert!(MicrovmState::decode(&s.encode().unwrap()).is_err());
        for khz in [0, 999, 20_000_001] {
            let mut s = state();
            s.tsc_khz = Some(khz);
            let err = MicrovmState::decode(&s.encode().unwrap()).unwrap_err();
            assert!(matches!(err, StateFormatError::Invalid(_)), "{khz}: {err}");
        }
        let mut s = state();
        s.vcpus[0].xsave.truncate(10);
        assert!(matches!(
            MicrovmState::decode(&s.encode().unwrap()),
            Err(StateFormatError::Vcpu(_))
        ));
    }
}
