-- One batch of planned two-leg entries carried out in one statement (batch_plan::entries,
-- for transfers and deposits). $1..$8 the created movements in batch order (key,
-- fingerprint, from, to, currency, amount, from's balance after or NULL for a system
-- account, to's balance after), $9/$10 the customer accounts' final balances, $11 the
-- claimed keys nothing was created under (given back), $12 each created movement's
-- metadata (canonical JSON text or NULL), in batch order, $13 the entries' kind (also
-- their reference's prefix: 'transfer:<key>', 'deposit:<key>').
WITH de AS MATERIALIZED (
    -- Each movement's entry id is drawn here, in batch order, so nothing joins back.
    SELECT t.*, nextval('journal_entries_id_seq') AS entry_id
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::bigint[],
                $7::bigint[], $8::bigint[], $12::text[])
        WITH ORDINALITY AS t(key, fingerprint, from_id, to_id, currency, amount, from_after, to_after, metadata, n)
    ORDER BY n
), e AS (
    INSERT INTO journal_entries (id, kind, reference, metadata)
    SELECT entry_id, $13::text, $13::text || ':' || key, metadata FROM de ORDER BY entry_id
    RETURNING id
), p AS (
    INSERT INTO postings (entry_id, account_id, currency, amount_minor, balance_after_minor)
    SELECT entry_id, account, currency, amount, after FROM (
        SELECT n, 0 AS leg, entry_id, from_id AS account, currency, -amount AS amount, from_after AS after FROM de
        UNION ALL
        SELECT n, 1, entry_id, to_id, currency, amount, to_after FROM de
    ) legs
    -- Posting ids follow batch order, so each account's running balance reads in order.
    ORDER BY n, leg
    RETURNING 1
), b AS (
    UPDATE accounts a SET balance_minor = v.balance
    FROM unnest($9::bigint[], $10::bigint[]) AS v(id, balance) WHERE a.id = v.id
    RETURNING 1
), k AS (
    -- The fingerprint too: the key may have been claimed with an earlier item's request
    -- that was refused; and the operation: a key taken over may have been another's.
    UPDATE idempotency_keys i SET result_id = de.entry_id, request_fingerprint = de.fingerprint, operation = $13::text
    FROM de WHERE i.key = de.key AND i.result_id IS NULL
    RETURNING 1
), gone AS (
    DELETE FROM idempotency_keys i WHERE i.key = ANY($11::text[]) AND i.result_id IS NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM p) AS postings,
       (SELECT count(*) FROM b) AS balances,
       (SELECT count(*) FROM k) AS keys,
       (SELECT count(*) FROM gone) AS given_back,
       COALESCE((SELECT array_agg(de.entry_id ORDER BY de.n) FROM de), '{}') AS entries
