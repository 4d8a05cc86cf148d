//! Harness for kya end-to-end tests.
