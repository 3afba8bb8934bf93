//! Runbook parsing tests.
