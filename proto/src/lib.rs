//! Wire formats shared by the Fissile VMM, snapshotd and the guest agent.
//!
//! Every protocol here is framed, versioned and size-capped; see each module's docs for the
//! exact encoding.

pub mod agent;
pub mod control;
pub mod frame;
pub mod snapshotd;
