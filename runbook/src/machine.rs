//! The journaled upgrade step machine.
