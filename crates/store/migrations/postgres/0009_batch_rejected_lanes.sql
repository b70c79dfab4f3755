-- The lanes a batch did not take and why, as chosen at creation (a JSON array of
-- `{kind, route?, reason}`), for the billing receipt's `rejected_lanes`.
ALTER TABLE batches ADD COLUMN rejected_lanes TEXT;
