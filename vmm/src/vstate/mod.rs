//! Thin owners of KVM objects: the VM (memory slots, irqchip, PIT) and the vCPU threads.

pub mod vcpu;
pub mod vm;
