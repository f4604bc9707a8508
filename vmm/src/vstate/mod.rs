//! Thin owners of KVM objects: the VM (memory slots, irqchip, PIT), the vCPU threads, and
//! saving/restoring what KVM holds for them.

pub mod persist;
pub mod vcpu;
pub mod vm;
