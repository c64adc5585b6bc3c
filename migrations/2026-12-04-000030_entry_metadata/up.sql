-- Free-form metadata on journal entries (a transfer's, given by its caller), returned with
-- them. Stored as the caller's JSON object, canonical text; the database refuses anything
-- that is not a JSON object or is larger than 4 KiB, whatever wrote it.
ALTER TABLE journal_entries ADD COLUMN metadata text
    CONSTRAINT journal_entries_metadata_object
    CHECK (metadata IS NULL OR (octet_length(metadata) <= 4096 AND jsonb_typeof(metadata::jsonb) = 'object'));
