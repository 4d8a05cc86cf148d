//! Layouts shared with the kernel side (placeholder until the BPF maps land).

/// `SO_MARK` carried by the interceptor's own sockets; the kernel programs never redirect them.
pub const KYA_SKIP_MARK: u32 = 0x004b_5941;
