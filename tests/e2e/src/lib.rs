//! Trellis sandbox: a real control plane for end-to-end tests (arrives next).
