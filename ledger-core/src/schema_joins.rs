//! Joins between tables whose references the database checks with statement triggers
//! instead of foreign keys (migrations 2026-12-07-000020 and 2026-12-07-000030), so
//! `diesel print-schema` no longer writes them into `schema.rs`: written here by hand.
//! Each is as sound as a foreign key: the named row is checked when the reference is
//! written, and it never goes away (ARCHITECTURE.md, invariant 1).

use crate::schema::*;

diesel::joinable!(payouts -> journal_entries (resolution_entry_id));
diesel::joinable!(payouts -> withdrawals (withdrawal_id));
diesel::joinable!(postings -> journal_entries (entry_id));
diesel::joinable!(withdrawals -> journal_entries (entry_id));
