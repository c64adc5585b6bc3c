-- One batch's decisions carried out in one statement (withdrawals::batch::write_plan).
-- $1..$7 the debits (job, account, currency, amount, balance after, in-transit account,
-- destination), $8/$9 the accounts' final balances, $10/$11 the refusals (job, reason),
-- $12 the payouts' claim lease in ms, or NULL to queue them unclaimed.
WITH de AS MATERIALIZED (
    -- Each debit's entry id is drawn here, in job order, so nothing joins back.
    SELECT d.*, nextval('journal_entries_id_seq') AS entry_id
    FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[],
                $6::bigint[], $7::text[])
        WITH ORDINALITY AS d(wid, account_id, currency, amount, after, transit, destination, n)
    ORDER BY n
), d AS (
    SELECT * FROM de
), e AS (
    INSERT INTO journal_entries (id, kind, reference)
    SELECT entry_id, 'withdrawal', 'withdrawal:' || wid FROM de ORDER BY entry_id
    RETURNING id
), p AS (
    INSERT INTO postings (entry_id, account_id, currency, amount_minor, balance_after_minor)
    SELECT entry_id, account, currency, amount, after FROM (
        SELECT wid, 0 AS leg, entry_id, account_id AS account, currency, -amount AS amount, after FROM de
        UNION ALL
        SELECT wid, 1, entry_id, transit, currency, amount, NULL FROM de
    ) legs
    -- Posting ids follow job order, so each account's running balance reads in order.
    ORDER BY wid, leg
    RETURNING 1
), b AS (
    UPDATE accounts a SET balance_minor = v.balance
    FROM unnest($8::bigint[], $9::bigint[]) AS v(id, balance) WHERE a.id = v.id
    RETURNING 1
), po AS (
    -- With a lease ($12), each payout is claimed as it is queued (see
    -- process_batch_fast_claiming_tx): the same fields claim_due would set.
    INSERT INTO payouts (withdrawal_id, account_id, currency, amount_minor, destination, idempotency_key,
                         claim_token, possibly_sent, attempts, next_attempt_at)
    SELECT wid, account_id, currency, amount, destination, ledger_payout_key(wid),
           CASE WHEN $12::bigint IS NULL THEN NULL ELSE nextval('payout_claim_tokens') END,
           $12::bigint IS NOT NULL,
           CASE WHEN $12::bigint IS NULL THEN 0 ELSE 1 END,
           now() + make_interval(secs => COALESCE($12::bigint, 0)::float8 / 1000)
    FROM d ORDER BY wid
    RETURNING id, withdrawal_id, claim_token, idempotency_key
), wd AS (
    -- Debited jobs, then refused ones: each row reached by id. (IS NOT DISTINCT
    -- FROM rather than =: an equality on status would offer the planner the
    -- pending partial index as a path, see tx::with_batch_plans.)
    UPDATE withdrawals x
    SET status = 'paying_out', entry_id = de.entry_id, reason = NULL,
        attempts = x.attempts + 1, finished_at = clock_timestamp()
    FROM de
    WHERE x.id = de.wid AND x.status IS NOT DISTINCT FROM 'pending'
    RETURNING 1
), w AS (
    UPDATE withdrawals x
    SET status = 'rejected', reason = v.reason,
        attempts = x.attempts + 1, finished_at = clock_timestamp()
    FROM unnest($10::bigint[], $11::text[]) AS v(id, reason)
    WHERE x.id = v.id AND x.status IS NOT DISTINCT FROM 'pending'
    RETURNING 1
)
SELECT (SELECT count(*) FROM p) AS postings,
       (SELECT count(*) FROM b) AS balances,
       (SELECT count(*) FROM wd) + (SELECT count(*) FROM w) AS jobs,
       COALESCE((SELECT array_agg(de.wid ORDER BY de.wid) FROM de), '{}') AS debited,
       COALESCE((SELECT array_agg(de.entry_id ORDER BY de.wid) FROM de), '{}') AS entries,
       COALESCE((SELECT array_agg(po.id ORDER BY po.withdrawal_id) FROM po), '{}') AS payouts,
       COALESCE((SELECT array_agg(po.claim_token ORDER BY po.withdrawal_id) FROM po), '{}') AS tokens,
       COALESCE((SELECT array_agg(po.idempotency_key ORDER BY po.withdrawal_id) FROM po), '{}') AS keys,
       (EXTRACT(EPOCH FROM now() + make_interval(secs => COALESCE($12::bigint, 0)::float8 / 1000)
                           - clock_timestamp()) * 1000)::float8 AS lease_left_ms
