//! User-facing VM configuration: parsed from flags or a TOML file, then validated.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Kernel command line used when nothing else is configured. `root`, `rootfstype` and `init`
/// are appended separately so they can be overridden.
///
/// `clocksource=kvm-clock`: the guest keeps time with kvm-clock, which a restore sets
/// (`KVM_SET_CLOCK`) and which stays right on a host whose TSC runs at another rate (its
/// TSC-deadline timers do not: see `vstate::persist`); a 6.12 guest would otherwise prefer
/// an invariant TSC. `tsc=nowatchdog`: the clocksource watchdog
/// checking the TSC against kvm-clock would wake every guest, idle or not, twice a second.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noaux \
                                   i8042.nomux i8042.dumbkbd clocksource=kvm-clock \
                                   tsc=nowatchdog";
/// Default root filesystem type.
pub const DEFAULT_ROOT_FSTYPE: &str = "ext4";
/// Default init program inside the guest.
pub const DEFAULT_INIT: &str = "/usr/sbin/fissile-agent";
/// Default guest vsock context id.
pub const DEFAULT_GUEST_CID: u32 = 3;
/// Largest vCPU count we accept (the MP table and APIC ids are laid out for at most this).
pub const MAX_VCPUS: u8 = 32;

/// Complete configuration of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest memory in MiB.
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Uncompressed ELF `vmlinux` with a PVH entry note.
    pub kernel: PathBuf,
    /// Read-only root filesystem image (file or block device): `/dev/vda`.
    pub rootfs: PathBuf,
    /// Optional writable scratch image: `/dev/vdb`.
    #[serde(default)]
    pub scratch: Option<PathBuf>,
    /// Extra kernel command line, appended after the defaults.
    #[serde(default)]
    pub cmdline_extra: String,
    /// Root filesystem type passed as `rootfstype=`.
    #[serde(default = "default_root_fstype")]
    pub root_fstype: String,
    /// Init program passed as `init=`.
    #[serde(default = "default_init")]
    pub init: String,
    /// Where the guest serial console goes. `None`: discarded unless `serial_stderr`.
    #[serde(default)]
    pub serial_log: Option<PathBuf>,
    /// Send the guest serial console to stderr (when no `serial_log` is set).
    #[serde(default)]
    pub serial_stderr: bool,
    /// Host side of the virtio-vsock device (unix socket path). `None`: no vsock device.
    #[serde(default)]
    pub vsock_uds: Option<PathBuf>,
    /// Guest vsock context id.
    #[serde(default = "default_guest_cid")]
    pub guest_cid: u32,
    /// Control socket path. `None`: no control socket.
    #[serde(default)]
    pub api_sock: Option<PathBuf>,
    /// Add a virtio-rng device.
    #[serde(default = "default_true")]
    pub rng: bool,
    /// Add a virtio-net device attached to this host tap (created and configured by the
    /// caller, usually inside the sandbox's network namespace). `None`: no network device.
    #[serde(default)]
    pub net_tap: Option<String>,
    /// The guest's MAC address (`fissile_proto::net::GUEST_MAC` unless set; the same in every sandbox,
    /// so a restored or forked guest needs no reconfiguration).
    #[serde(default = "default_mac")]
    pub net_mac: MacAddr,
    /// snapshotd's socket: needed for snapshot, fork and merge.
    #[serde(default)]
    pub snapshotd: Option<PathBuf>,
}

fn default_mem_mib() -> u64 {
    256
}
fn default_vcpus() -> u8 {
    1
}
fn default_root_fstype() -> String {
    DEFAULT_ROOT_FSTYPE.to_string()
}
fn default_init() -> String {
    DEFAULT_INIT.to_string()
}
fn default_guest_cid() -> u32 {
    DEFAULT_GUEST_CID
}
fn default_true() -> bool {
    true
}
fn default_mac() -> MacAddr {
    MacAddr(fissile_proto::net::GUEST_MAC)
}

/// A MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "MAC address {s:?} is not six hex bytes separated by ':'"
            ));
        }
        for (b, p) in mac.iter_mut().zip(parts) {
            *b = match (p.len(), u8::from_str_radix(p, 16)) {
                (2, Ok(v)) => v,
                _ => return Err(format!("MAC address {s:?} has a bad byte {p:?}")),
            };
        }
        if mac[0] & 1 != 0 {
            return Err(format!("MAC address {s:?} is a multicast address"));
        }
        Ok(MacAddr(mac))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {0}")]
    ReadFile(PathBuf, #[source] std::io::Error),
    /// The config file is not valid TOML for [`VmConfig`].
    #[error("invalid config file {0}")]
    ParseFile(PathBuf, #[source] toml::de::Error),
    /// A required setting is missing.
    #[error("missing required setting `{0}`")]
    Missing(&'static str),
    /// The kernel image cannot be opened.
    #[error("kernel image {0} is missing or unreadable")]
    Kernel(PathBuf, #[source] std::io::Error),
    /// A disk image cannot be opened.
    #[error("{0} image {1} is missing or unreadable")]
    Image(&'static str, PathBuf, #[source] std::io::Error),
    /// Memory size out of range.
    #[error("memory size {0} MiB is out of range (64 MiB .. 1 TiB)")]
    MemorySize(u64),
    /// vCPU count out of range.
    #[error("vCPU count {0} is out of range (1 ..= {MAX_VCPUS})")]
    Vcpus(u8),
    /// Guest CID is reserved.
    #[error("guest CID {0} is reserved (must be >= 3)")]
    GuestCid(u32),
    /// A command line piece contains characters the kernel would misparse.
    #[error("{0} contains a newline or NUL byte")]
    BadCmdline(&'static str),
}

impl VmConfig {
    /// A config with defaults for everything except the kernel and root image.
    pub fn new(kernel: impl Into<PathBuf>, rootfs: impl Into<PathBuf>) -> Self {
        Self {
            mem_mib: default_mem_mib(),
            vcpus: default_vcpus(),
            kernel: kernel.into(),
            rootfs: rootfs.into(),
            scratch: None,
            cmdline_extra: String::new(),
            root_fstype: default_root_fstype(),
            init: default_init(),
            serial_log: None,
            serial_stderr: false,
            vsock_uds: None,
            guest_cid: default_guest_cid(),
            api_sock: None,
            rng: true,
            net_tap: None,
            net_mac: default_mac(),
            snapshotd: None,
        }
    }

    /// Reads a TOML config file.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::ReadFile(path.to_path_buf(), e))?;
        toml::from_str(&text).map_err(|e| ConfigError::ParseFile(path.to_path_buf(), e))
    }

    /// Checks ranges and that every file the VM needs can be opened.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(64..=1024 * 1024).contains(&self.mem_mib) {
            return Err(ConfigError::MemorySize(self.mem_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.guest_cid < 3 {
            return Err(ConfigError::GuestCid(self.guest_cid));
        }
        for (name, value) in [
            ("cmdline_extra", &self.cmdline_extra),
            ("root_fstype", &self.root_fstype),
            ("init", &self.init),
        ] {
            if value.contains(['\n', '\0']) {
                return Err(ConfigError::BadCmdline(name));
            }
        }
        File::open(&self.kernel).map_err(|e| ConfigError::Kernel(self.kernel.clone(), e))?;
        File::open(&self.rootfs).map_err(|e| ConfigError::Image("root", self.rootfs.clone(), e))?;
        if let Some(scratch) = &self.scratch {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(scratch)
                .map_err(|e| ConfigError::Image("scratch", scratch.clone(), e))?;
        }
        Ok(())
    }

    /// The kernel command line before the per-device `virtio_mmio.device=` entries.
    pub fn base_cmdline(&self) -> String {
        let mut line = format!(
            "{DEFAULT_CMDLINE} root=/dev/vda ro rootfstype={} init={}",
            self.root_fstype, self.init
        );
        let extra = self.cmdline_extra.trim();
        if !extra.is_empty() {
            line.push(' ');
            line.push_str(extra);
        }
        line
    }
}

/// What a restoring VMM must rebuild besides the state: the machine's shape and the host
/// resources its devices use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// The root image (the restoring VMM may be given another path to the same image).
    pub rootfs: PathBuf,
    /// Guest vsock CID (`None`: no vsock device).
    pub guest_cid: Option<u32>,
    /// A virtio-rng device exists.
    pub rng: bool,
    /// A virtio-net device exists, with this MAC (the restoring VMM is given its own tap).
    pub net_mac: Option<[u8; 6]>,
    /// The kernel command line the guest booted with (for information).
    pub cmdline: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_kernel_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("root.img");
        std::fs::write(&rootfs, [0u8; 512]).unwrap();
        let config = VmConfig::new(dir.path().join("no-such-vmlinux"), &rootfs);

        let err = config.validate().unwrap_err();

        assert!(matches!(err, ConfigError::Kernel(..)));
        assert!(err.to_string().contains("no-such-vmlinux"), "{err}");
        assert!(err.to_string().contains("missing or unreadable"), "{err}");
    }

    #[test]
    fn missing_rootfs_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"x").unwrap();
        let config = VmConfig::new(&kernel, dir.path().join("nope.img"));

        let err = config.validate().unwrap_err();

        assert!(matches!(err, ConfigError::Image("root", ..)), "{err}");
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let mut config = VmConfig::new("/k", "/r");
        config.vcpus = 0;
        assert!(matches!(config.validate(), Err(ConfigError::Vcpus(0))));
        config.vcpus = 1;
        config.mem_mib = 1;
        assert!(matches!(config.validate(), Err(ConfigError::MemorySize(1))));
        config.mem_mib = 256;
        config.guest_cid = 2;
        assert!(matches!(config.validate(), Err(ConfigError::GuestCid(2))));
    }

    #[test]
    fn default_cmdline_has_root_init_and_extra() {
        let mut config = VmConfig::new("/k", "/r");
        config.cmdline_extra = " loglevel=4 ".into();
        config.init = "/sbin/init".into();

        let line = config.base_cmdline();

        assert_eq!(
            line,
            "console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noaux i8042.nomux \
             i8042.dumbkbd clocksource=kvm-clock tsc=nowatchdog root=/dev/vda ro \
             rootfstype=ext4 init=/sbin/init loglevel=4"
        );
    }

    #[test]
    fn toml_config_file_parses_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(
            &path,
            "kernel = \"/k\"\nrootfs = \"/r\"\nmem_mib = 512\nvcpus = 2\n",
        )
        .unwrap();

        let config = VmConfig::from_toml_file(&path).unwrap();

        assert_eq!(config.mem_mib, 512);
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.guest_cid, DEFAULT_GUEST_CID);
        assert_eq!(config.init, DEFAULT_INIT);
    }

    #[test]
    fn toml_config_unknown_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(&path, "kernel = \"/k\"\nrootfs = \"/r\"\nmemory = 5\n").unwrap();

        assert!(matches!(
            VmConfig::from_toml_file(&path),
            Err(ConfigError::ParseFile(..))
        ));
    }
}
