//! Host checks: can this host's KVM boot a standard guest, how much memory can it give, and
//! are we inside the lab (QEMU TCG), which needs a CPUID quirk.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

/// Why this host cannot run a VM.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `/dev/kvm` does not exist.
    #[error(
        "/dev/kvm does not exist: this host has no KVM (load kvm_intel/kvm_amd or run on a host with virtualization)"
    )]
    NoKvm,
    /// `/dev/kvm` exists but cannot be opened.
    #[error("/dev/kvm cannot be opened (are you in the kvm group?)")]
    KvmAccess(#[source] std::io::Error),
    /// The host KVM is KVM-PVM.
    #[error(
        "this host's KVM is PVM and cannot boot a standard guest; run it in the lab: {lab_command}"
    )]
    Pvm {
        /// The command that runs the same VM in the lab.
        lab_command: String,
    },
    /// More memory requested than the host has available.
    #[error(
        "requested {requested_mib} MiB of guest memory but the host has only {available_mib} MiB available"
    )]
    NotEnoughMemory {
        /// Requested guest memory.
        requested_mib: u64,
        /// `MemAvailable` from /proc/meminfo.
        available_mib: u64,
    },
    /// /proc/meminfo could not be read or parsed.
    #[error("cannot read MemAvailable from /proc/meminfo")]
    MemInfo,
}

/// Checks that `/dev/kvm` exists, can be opened, and is not KVM-PVM. `args` are the VMM's own
/// arguments, used to print the equivalent lab command.
pub fn check_kvm(args: &[String]) -> Result<(), HostError> {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        return Err(HostError::NoKvm);
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm)
        .map_err(HostError::KvmAccess)?;
    if is_kvm_pvm() {
        return Err(HostError::Pvm {
            lab_command: lab_command(args),
        });
    }
    Ok(())
}

/// The lab command that runs `fissile-vmm` with the same arguments.
pub fn lab_command(args: &[String]) -> String {
    let mut cmd = String::from("fissile-lab run -- fissile-vmm");
    for arg in args {
        cmd.push(' ');
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
            cmd.push('\'');
            cmd.push_str(&arg.replace('\'', "'\\''"));
            cmd.push('\'');
        } else {
            cmd.push_str(arg);
        }
    }
    cmd
}

/// True when the host KVM is KVM-PVM. `/sys/module` answers without more work where it can
/// ([`kvm_vendor_module`]); failing that, `CONFIG_KVM_PVM=y` in /proc/config.gz (which costs
/// a `zcat`), or no `svm`/`vmx` CPU flag although `/dev/kvm` exists.
pub fn is_kvm_pvm() -> bool {
    match kvm_vendor_module(Path::new("/sys/module")) {
        Some(module) => return module == KVM_PVM_MODULE,
        None if kernel_config_has("CONFIG_KVM_PVM=y") == Some(true) => return true,
        None => {}
    }
    match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(cpuinfo) => !cpuinfo_has_virt_flag(&cpuinfo),
        Err(_) => false,
    }
}

/// KVM-PVM's vendor module.
const KVM_PVM_MODULE: &str = "kvm_pvm";

/// The KVM vendor module according to `sys_module` (`/sys/module`): `kvm_pvm` if it is there
/// at all (loaded, or built in); else `kvm_amd` or `kvm_intel` if it is a loaded module (it
/// has an `initstate`; one whose init failed is unloaded). KVM takes one vendor module at a
/// time. A built-in `kvm_amd`/`kvm_intel` has a directory even where its init failed (the
/// other vendor's CPU), so it says nothing: `None`.
fn kvm_vendor_module(sys_module: &Path) -> Option<&'static str> {
    if sys_module.join(KVM_PVM_MODULE).is_dir() {
        return Some(KVM_PVM_MODULE);
    }
    ["kvm_amd", "kvm_intel"]
        .into_iter()
        .find(|m| sys_module.join(m).join("initstate").is_file())
}

/// True if any `flags` line of /proc/cpuinfo text lists `svm` or `vmx`.
pub fn cpuinfo_has_virt_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "svm" || f == "vmx"))
}

/// Looks for a line in /proc/config.gz (decompressed with `zcat`). `None` if unavailable.
fn kernel_config_has(line: &str) -> Option<bool> {
    if !Path::new("/proc/config.gz").exists() {
        return None;
    }
    let mut child = Command::new("zcat")
        .arg("/proc/config.gz")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut text = String::new();
    let read = child.stdout.take()?.read_to_string(&mut text);
    let status = child.wait().ok()?;
    if read.is_err() || !status.success() {
        return None;
    }
    Some(text.lines().any(|l| l.trim() == line))
}

/// `MemAvailable` from /proc/meminfo, in MiB.
pub fn mem_available_mib() -> Result<u64, HostError> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|_| HostError::MemInfo)?;
    parse_mem_available_mib(&text).ok_or(HostError::MemInfo)
}

/// Parses `MemAvailable:  N kB` out of /proc/meminfo text.
pub fn parse_mem_available_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Refuses a guest larger than the memory the host has available.
pub fn check_memory(requested_mib: u64) -> Result<(), HostError> {
    let available_mib = mem_available_mib()?;
    if requested_mib > available_mib {
        return Err(HostError::NotEnoughMemory {
            requested_mib,
            available_mib,
        });
    }
    Ok(())
}

/// True when we run inside QEMU TCG (the lab): host CPUID leaf 0x40000000 says "TCGTCGTCGTCG".
pub fn is_lab_tcg() -> bool {
    hypervisor_signature() == *b"TCGTCGTCGTCG"
}

/// The 12-byte hypervisor vendor signature from CPUID leaf 0x40000000 (zeros on bare metal).
pub fn hypervisor_signature() -> [u8; 12] {
    let leaf1 = std::arch::x86_64::__cpuid(1);
    if leaf1.ecx & (1 << 31) == 0 {
        return [0; 12];
    }
    let leaf = std::arch::x86_64::__cpuid(0x4000_0000);
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&leaf.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&leaf.ecx.to_le_bytes());
    sig[8..12].copy_from_slice(&leaf.edx.to_le_bytes());
    sig
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_without_svm_or_vmx_has_no_virt_flag() {
        let text = "processor : 0\nflags\t\t: fpu vme de pse sse2 hypervisor\n";
        assert!(!cpuinfo_has_virt_flag(text));
        let text = "processor : 0\nflags\t\t: fpu svm sse2\n";
        assert!(cpuinfo_has_virt_flag(text));
    }

    #[test]
    fn the_loaded_vendor_module_names_the_kvm() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(kvm_vendor_module(dir.path()), None);
        std::fs::create_dir(dir.path().join("kvm")).unwrap();
        // Built in (no initstate): says nothing.
        std::fs::create_dir(dir.path().join("kvm_amd")).unwrap();
        assert_eq!(kvm_vendor_module(dir.path()), None);
        std::fs::write(dir.path().join("kvm_amd/initstate"), "live\n").unwrap();
        assert_eq!(kvm_vendor_module(dir.path()), Some("kvm_amd"));
        std::fs::create_dir(dir.path().join(KVM_PVM_MODULE)).unwrap();
        assert_eq!(kvm_vendor_module(dir.path()), Some(KVM_PVM_MODULE));
    }

    #[test]
    fn meminfo_parses_mem_available() {
        let text = "MemTotal: 100 kB\nMemAvailable:    2097152 kB\n";
        assert_eq!(parse_mem_available_mib(text), Some(2048));
        assert_eq!(parse_mem_available_mib("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn lab_command_quotes_arguments_with_spaces() {
        let args = vec!["--kernel".to_string(), "a b".to_string()];
        assert_eq!(
            lab_command(&args),
            "fissile-lab run -- fissile-vmm --kernel 'a b'"
        );
    }

    #[test]
    fn too_much_memory_is_refused() {
        let err = check_memory(u64::MAX / 2).unwrap_err();
        assert!(matches!(err, HostError::NotEnoughMemory { .. }), "{err}");
    }
}
