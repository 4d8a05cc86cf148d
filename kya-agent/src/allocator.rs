//! The daemon's memory allocator: mimalloc, set up not to sit on freed memory.
//!
//! Every call allocates and frees buffers of many sizes on several threads
//! (TLS records, HTTP heads, JSON, audit records). With the C library's
//! allocator, its arena locks and the consolidation of freed chunks took
//! about a tenth of the daemon's CPU time under load; mimalloc serves the
//! kept-alive load with a third more calls per second (BENCHMARKS.md).
//! Its defaults keep freed pages for a second before giving them back to the
//! kernel, and commit arenas eagerly: an idle daemon then held two and a half
//! times the resident memory. Here freed pages go back after 10 ms (at once
//! slowed the 1 MiB SSE relay by a third) and arenas are committed on demand.
//! The options are set before mimalloc's first allocation (an ELF
//! constructor in `main.rs`): some are read only at its start.

/// `kya`'s global allocator (set in `main.rs`).
pub type Allocator = mimalloc::MiMalloc;

/// mimalloc's option numbers (`mi_option_e` in the bundled `mimalloc.h`, v3),
/// pinned by a test to the library's own defaults.
const OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// How long freed pages are kept for reuse before they go back to the kernel.
const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Purge freed memory after 10 ms and commit arenas on demand. Call before
/// the first allocation, while the process has one thread (mimalloc's option
/// setters are not thread-safe).
pub fn configure() {
    // SAFETY: plain setters of mimalloc's global options, called before
    // any other thread exists.
    unsafe {
        libmimalloc_sys::mi_option_set(OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        libmimalloc_sys::mi_option_set(OPTION_ARENA_EAGER_COMMIT, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers name the options meant: their defaults in the bundled
    /// `options.c` (`purge_delay` 1000 ms, `arena_eager_commit` 2), read from the linked
    /// library in a process where nothing has set them.
    const CHILD: &str = "KYA_ALLOCATOR_TEST_CHILD";

    #[test]
    fn option_numbers_name_purge_delay_and_arena_eager_commit() {
        crate::test_child::rerun_alone(
            "allocator::tests::option_numbers_child",
            (CHILD, "1"),
            &[],
            "allocator child: ok",
        );
    }

    #[test]
    fn option_numbers_child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        // SAFETY: reads of mimalloc's options, in a child with one test thread.
        let (purge, eager) = unsafe {
            (
                libmimalloc_sys::mi_option_get(OPTION_PURGE_DELAY),
                libmimalloc_sys::mi_option_get(OPTION_ARENA_EAGER_COMMIT),
            )
        };
        assert_eq!((purge, eager), (1000, 2));
        configure();
        // SAFETY: as above.
        let purge = unsafe { libmimalloc_sys::mi_option_get(OPTION_PURGE_DELAY) };
        assert_eq!(purge, PURGE_DELAY_MS);
        println!("allocator child: ok");
    }
}
