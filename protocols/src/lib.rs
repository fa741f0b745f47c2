//! The agent API shared by the agent and the runtime: its `.proto` files and
//! the ttrpc code generated from them.
//!
//! Not written yet: the next issue fills it in.
