//! The guest agent: PID 1 of the microVM. It mounts the guest's file systems
//! and serves the agent API over vsock (port 1024), creating and running OCI
//! containers inside the guest.
//!
//! Not written yet: the next issue fills it in.
