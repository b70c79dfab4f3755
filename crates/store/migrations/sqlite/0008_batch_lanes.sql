-- Batch lanes. A batch runs either on the realtime lane (each item through the router, claimed
-- by the workers) or on a provider's native batch API (`lane = 'native'`): one worker holds the
-- batch with a lease (`native_owner`, `native_lease_until_ms`), submits its items once, stores
-- the provider's batch id, and polls it; a restart finds the id and resumes polling instead of
-- submitting again. Items of a native-lane batch stay `pending` (the realtime claim skips
-- them) until their results arrive; falling back to the realtime lane is `lane = 'realtime'`.

ALTER TABLE batches ADD COLUMN lane TEXT NOT NULL DEFAULT 'realtime';
-- The native lane's route, `provider/upstream-model`.
ALTER TABLE batches ADD COLUMN lane_route TEXT;
ALTER TABLE batches ADD COLUMN native_batch_id TEXT;
ALTER TABLE batches ADD COLUMN native_owner TEXT;
ALTER TABLE batches ADD COLUMN native_lease_until_ms INTEGER NOT NULL DEFAULT 0;
