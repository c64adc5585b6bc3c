// @generated automatically by Diesel CLI.

diesel::table! {
    accounts (id) {
        id -> Int8,
        owner -> Text,
        currency -> Text,
        kind -> Text,
        system_role -> Nullable<Text>,
        balance_minor -> Nullable<Int8>,
        overdraft_limit_minor -> Int8,
        status -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    currencies (code) {
        code -> Text,
        minor_units -> Int2,
        max_overdraft_minor -> Int8,
    }
}

diesel::table! {
    holds (id) {
        id -> Int8,
        payer_id -> Int8,
        payee_id -> Int8,
        currency -> Text,
        amount_minor -> Int8,
        posted_minor -> Int8,
        status -> Text,
        expires_at -> Nullable<Timestamptz>,
        idempotency_key -> Text,
        hold_entry_id -> Int8,
        resolution_entry_id -> Nullable<Int8>,
        created_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    idempotency_keys (key) {
        key -> Text,
        operation -> Text,
        request_fingerprint -> Text,
        result_id -> Nullable<Int8>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    journal_entries (id) {
        id -> Int8,
        kind -> Text,
        reference -> Nullable<Text>,
        created_at -> Timestamptz,
        metadata -> Nullable<Text>,
    }
}

diesel::table! {
    ledger_instance (singleton) {
        singleton -> Bool,
        instance_id -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    payouts (id) {
        id -> Int8,
        withdrawal_id -> Int8,
        account_id -> Int8,
        currency -> Text,
        amount_minor -> Int8,
        destination -> Text,
        idempotency_key -> Text,
        status -> Text,
        attempts -> Int4,
        next_attempt_at -> Timestamptz,
        last_error -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        resolution_entry_id -> Nullable<Int8>,
        gateway_reference -> Nullable<Text>,
        claim_token -> Nullable<Int8>,
        possibly_sent -> Bool,
        forced_return_reason -> Nullable<Text>,
    }
}

diesel::table! {
    postings (id) {
        id -> Int8,
        entry_id -> Int8,
        account_id -> Int8,
        currency -> Text,
        amount_minor -> Int8,
        balance_after_minor -> Nullable<Int8>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    withdrawals (id) {
        id -> Int8,
        account_id -> Int8,
        currency -> Text,
        amount_minor -> Int8,
        destination -> Text,
        idempotency_key -> Text,
        status -> Text,
        reason -> Nullable<Text>,
        attempts -> Int4,
        last_error -> Nullable<Text>,
        entry_id -> Nullable<Int8>,
        created_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
        next_attempt_at -> Timestamptz,
    }
}

diesel::joinable!(accounts -> currencies (currency));

diesel::allow_tables_to_appear_in_same_query!(
    accounts,
    currencies,
    holds,
    idempotency_keys,
    journal_entries,
    ledger_instance,
    payouts,
    postings,
    withdrawals,
);
