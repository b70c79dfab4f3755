//! Files, batches and webhook deliveries: per-org isolation, items claimed and completed exactly
//! once, cancel and finish, idempotency keys, and native-lane leases.

use marga_store::{BatchRecord, DeliveryRecord, FileRecord, NewItem, LANE_NATIVE};

use crate::backend::Ctx;
use crate::fixtures::now_ms;

// Files and batches

fn file(id: &str, org_id: &str, purpose: &str) -> FileRecord {
    FileRecord {
        id: id.to_owned(),
        org_id: org_id.to_owned(),
        purpose: purpose.to_owned(),
        filename: format!("{id}.jsonl"),
        bytes: 10,
        lines: 2,
        created_at_ms: now_ms(),
    }
}

fn batch(id: &str, org_id: &str, total: i64) -> BatchRecord {
    BatchRecord {
        id: id.to_owned(),
        org_id: org_id.to_owned(),
        key_id: "key-1".to_owned(),
        endpoint: "/v1/chat/completions".to_owned(),
        input_file_id: "file-in".to_owned(),
        completion_window: "24h".to_owned(),
        metadata: Some(r#"{"k":"v"}"#.to_owned()),
        status: "in_progress".to_owned(),
        total,
        created_at_ms: now_ms(),
        in_progress_at_ms: Some(now_ms()),
        expires_at_ms: now_ms() + 86_400_000,
        ..BatchRecord::default()
    }
}

fn items(n: usize) -> Vec<NewItem> {
    (0..n).map(|i| NewItem { custom_id: format!("req-{i}"), body: format!(r#"{{"n":{i}}}"#) }).collect()
}

pub(crate) async fn files_crud_paging_and_isolation(ctx: &Ctx) {
    let repos = ctx.repos.as_ref();
    let a = file("file-a", "org-1", "batch");
    for f in [&a, &file("file-b", "org-1", "batch"), &file("file-c", "org-1", "batch")] {
        repos.create_file(f).await.unwrap();
    }
    repos.create_file(&file("file-d", "org-1", "batch_output")).await.unwrap();
    repos.create_file(&file("file-x", "org-2", "batch")).await.unwrap();
    assert_eq!(repos.get_file("org-1", "file-a").await.unwrap(), Some(a));
    assert_eq!(repos.get_file("org-2", "file-a").await.unwrap(), None, "another org's file is invisible");
    let ids = |files: Vec<FileRecord>| files.into_iter().map(|f| f.id).collect::<Vec<_>>();
    assert_eq!(ids(repos.list_files("org-1", None, None, 10).await.unwrap()), ["file-d", "file-c", "file-b", "file-a"]);
    assert_eq!(ids(repos.list_files("org-1", Some("batch"), None, 2).await.unwrap()), ["file-c", "file-b"]);
    assert_eq!(ids(repos.list_files("org-1", Some("batch"), Some("file-b"), 10).await.unwrap()), ["file-a"]);
    assert!(!repos.delete_file("org-2", "file-a").await.unwrap(), "another org cannot delete it");
    assert!(repos.delete_file("org-1", "file-a").await.unwrap());
    assert!(!repos.delete_file("org-1", "file-a").await.unwrap());
    assert_eq!(repos.get_file("org-1", "file-a").await.unwrap(), None);
}

pub(crate) async fn batch_items_are_claimed_and_completed_exactly_once(ctx: &Ctx) {
    let repos = ctx.repos.clone();
    repos.create_batch(&batch("batch-1", "org-1", 40), &items(40)).await.unwrap();
    let now = now_ms();
    // Four workers claim concurrently: every item is claimed once.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let repos = repos.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("w{w}");
            let mut mine = Vec::new();
            loop {
                let got = repos.claim_items(&owner, now, now + 60_000, 3).await.unwrap();
                if got.is_empty() {
                    return (owner, mine);
                }
                mine.extend(got);
            }
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        let (owner, mine) = task.await.unwrap();
        claimed.extend(mine.into_iter().map(|item| (owner.clone(), item)));
    }
    let mut idxs: Vec<i64> = claimed.iter().map(|(_, i)| i.idx).collect();
    idxs.sort_unstable();
    assert_eq!(idxs, (0..40).collect::<Vec<i64>>(), "each item claimed exactly once");
    let (owner, first) = claimed.iter().find(|(_, i)| i.idx == 0).unwrap();
    assert_eq!((first.custom_id.as_str(), first.body.as_str(), first.attempts), ("req-0", r#"{"n":0}"#, 1));
    assert!(!repos.complete_item("batch-1", 0, "intruder", "{}", false).await.unwrap(), "not the owner");
    assert!(repos.complete_item("batch-1", 0, owner, r#"{"ok":0}"#, false).await.unwrap());
    assert!(!repos.complete_item("batch-1", 0, owner, r#"{"ok":0}"#, false).await.unwrap(), "done once");
    // An expired lease is claimed again by another worker; the first owner can no longer finish.
    let (owner1, item1) = claimed.iter().find(|(_, i)| i.idx == 1).unwrap();
    let later = now + 120_000;
    let again = repos.claim_items("w9", later, later + 60_000, 100).await.unwrap();
    assert_eq!(again.len(), 39, "every unfinished item's lease has expired");
    assert_eq!(again.iter().find(|i| i.idx == 1).unwrap().attempts, item1.attempts + 1);
    assert!(!repos.complete_item("batch-1", 1, owner1, "{}", false).await.unwrap(), "lease lost");
    assert!(repos.complete_item("batch-1", 1, "w9", r#"{"err":1}"#, true).await.unwrap());
    repos.renew_items("w9", &[("batch-1".to_owned(), 2)], later + 600_000).await.unwrap();
    let stolen = repos.claim_items("w10", later + 120_000, later + 180_000, 100).await.unwrap();
    assert!(stolen.iter().all(|i| i.idx != 2), "a renewed lease is not claimable");
    assert_eq!(stolen.len(), 37);
    let b = repos.get_batch("org-1", "batch-1").await.unwrap().unwrap();
    assert_eq!((b.completed, b.failed), (1, 1));
    assert_eq!(repos.unfinished_items("batch-1").await.unwrap(), 38);
    let results = repos.item_results("batch-1", -1, 10).await.unwrap();
    assert_eq!(results.iter().map(|r| (r.idx, r.result.as_str(), r.is_error)).collect::<Vec<_>>(), [
        (0, r#"{"ok":0}"#, false),
        (1, r#"{"err":1}"#, true)
    ]);
    assert_eq!(repos.item_results("batch-1", 0, 10).await.unwrap().len(), 1, "paged after idx 0");
}

pub(crate) async fn batch_status_cancel_and_finish(ctx: &Ctx) {
    let repos = ctx.repos.as_ref();
    repos.create_batch(&batch("batch-2", "org-1", 3), &items(3)).await.unwrap();
    repos.create_batch(&batch("batch-3", "org-2", 1), &items(1)).await.unwrap();
    assert!(repos.get_batch("org-2", "batch-2").await.unwrap().is_none(), "isolated");
    let ids = |v: Vec<BatchRecord>| v.into_iter().map(|b| b.id).collect::<Vec<_>>();
    assert_eq!(ids(repos.list_batches("org-1", None, 10).await.unwrap()), ["batch-2"]);
    assert_eq!(ids(repos.batches_in(&["in_progress"], 10).await.unwrap()), ["batch-2", "batch-3"]);
    let now = now_ms();
    let claimed = repos.claim_items("w1", now, now + 60_000, 1).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(repos.set_batch_status("batch-2", &["in_progress"], "cancelling", "cancelling_at_ms", now).await.unwrap());
    assert!(!repos.set_batch_status("batch-2", &["in_progress"], "cancelling", "cancelling_at_ms", now).await.unwrap());
    assert!(repos.claim_items("w2", now, now + 60_000, 10).await.unwrap().iter().all(|i| i.batch_id != "batch-2"));
    assert_eq!(repos.cancel_pending_items("batch-2", now).await.unwrap(), 1, "one still running");
    assert!(repos.complete_item("batch-2", claimed[0].idx, "w1", "{}", false).await.unwrap());
    assert_eq!(repos.cancel_pending_items("batch-2", now).await.unwrap(), 0);
    assert_eq!(repos.unfinished_items("batch-2").await.unwrap(), 0);
    let out = file("file-out-2", "org-1", "batch_output");
    assert!(repos.finish_batch("batch-2", "cancelled", Some(&out), None, now).await.unwrap());
    assert!(!repos.finish_batch("batch-2", "cancelled", Some(&out), None, now).await.unwrap(), "finished once");
    let b = repos.get_batch("org-1", "batch-2").await.unwrap().unwrap();
    assert_eq!((b.status.as_str(), b.output_file_id.as_deref(), b.cancelled_at_ms), ("cancelled", Some("file-out-2"), Some(now)));
    assert_eq!(b.metadata.as_deref(), Some(r#"{"k":"v"}"#));
    assert_eq!(repos.get_file("org-1", "file-out-2").await.unwrap(), Some(out));
    // Idempotency keys are unique per organisation.
    let keyed = |id: &str, org: &str| BatchRecord {
        idempotency_key: Some("key-12345".to_owned()),
        request_hash: Some("h".to_owned()),
        webhook_url: Some("https://hooks.example/x".to_owned()),
        webhook_secret: Some("s3cret-value".to_owned()),
        ..batch(id, org, 1)
    };
    repos.create_batch(&keyed("batch-4", "org-1"), &items(1)).await.unwrap();
    repos.create_batch(&keyed("batch-5", "org-2"), &items(1)).await.unwrap();
    assert!(repos.create_batch(&keyed("batch-6", "org-1"), &items(1)).await.is_err(), "the same key twice in one org");
    let found = repos.find_batch_by_key("org-1", "key-12345").await.unwrap().unwrap();
    assert_eq!((found.id.as_str(), found.webhook_url.as_deref()), ("batch-4", Some("https://hooks.example/x")));
    assert_eq!(found, repos.get_batch("org-1", "batch-4").await.unwrap().unwrap());
    assert_eq!(repos.find_batch_by_key("org-1", "other-key").await.unwrap(), None);
    assert!(repos.get_batch("org-1", "batch-6").await.unwrap().is_none(), "the failed create left nothing");
    // A batch past its window has nothing to claim.
    let late = BatchRecord { expires_at_ms: now - 1, ..batch("batch-7", "org-1", 2) };
    repos.create_batch(&late, &items(2)).await.unwrap();
    assert!(repos.claim_items("w3", now, now + 60_000, 100).await.unwrap().iter().all(|i| i.batch_id != "batch-7"));
}

pub(crate) async fn webhook_deliveries_are_claimed_once_and_retried(ctx: &Ctx) {
    let repos = ctx.repos.as_ref();
    let now = now_ms();
    let delivery = DeliveryRecord {
        id: "evt_1".to_owned(),
        batch_id: "batch-1".to_owned(),
        url: "https://hooks.example/x".to_owned(),
        secret: "secret-123".to_owned(),
        body: r#"{"type":"batch.completed"}"#.to_owned(),
        attempts: 0,
        max_attempts: 8,
        next_at_ms: now,
        state: "pending".to_owned(),
    };
    repos.enqueue_delivery(&delivery).await.unwrap();
    repos.enqueue_delivery(&delivery).await.unwrap(); // the same event twice: one row
    repos.enqueue_delivery(&DeliveryRecord { id: "evt_later".to_owned(), next_at_ms: now + 60_000, ..delivery.clone() }).await.unwrap();
    let claimed = repos.claim_deliveries("w1", now, now + 30_000, 10).await.unwrap();
    assert_eq!(claimed, vec![delivery.clone()], "only the due one");
    assert!(repos.claim_deliveries("w2", now, now + 30_000, 10).await.unwrap().is_empty(), "held by w1");
    assert!(!repos.finish_delivery("evt_1", "w2", "delivered", 1, now).await.unwrap(), "not w2's");
    assert!(repos.finish_delivery("evt_1", "w1", "pending", 1, now + 1000).await.unwrap());
    assert!(repos.claim_deliveries("w2", now + 500, now + 30_000, 10).await.unwrap().is_empty(), "not due yet");
    let again = repos.claim_deliveries("w2", now + 1000, now + 31_000, 10).await.unwrap();
    assert_eq!(again.iter().map(|d| (d.id.as_str(), d.attempts)).collect::<Vec<_>>(), [("evt_1", 1)]);
    // A claim whose holder died is taken over once its lease has passed.
    let taken = repos.claim_deliveries("w3", now + 40_000, now + 70_000, 10).await.unwrap();
    assert_eq!(taken.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["evt_1"]);
    assert!(repos.finish_delivery("evt_1", "w3", "delivered", 2, now).await.unwrap());
    assert_eq!(repos.get_delivery("evt_1").await.unwrap().map(|d| (d.state, d.attempts)), Some(("delivered".to_owned(), 2)));
    assert!(repos.claim_deliveries("w4", now + 100_000, now + 130_000, 10).await.unwrap().iter().all(|d| d.id != "evt_1"));
}

pub(crate) async fn native_lane_batches_are_leased_whole_and_completed_once(ctx: &Ctx) {
    let repos = ctx.repos.as_ref();
    let native = BatchRecord { lane: LANE_NATIVE.to_owned(), lane_route: Some("up/m".to_owned()), ..batch("batch-n", "org-1", 3) };
    repos.create_batch(&native, &items(3)).await.unwrap();
    let stored = repos.get_batch("org-1", "batch-n").await.unwrap().unwrap();
    assert_eq!((stored.lane.as_str(), stored.lane_route.as_deref(), stored.native_batch_id), (LANE_NATIVE, Some("up/m"), None));
    let now = now_ms();
    assert!(repos.claim_items("w1", now, now + 60_000, 100).await.unwrap().iter().all(|i| i.batch_id != "batch-n"), "not claimable");
    // One driver at a time: the lease is taken over only once it has lapsed.
    assert!(repos.lease_native("batch-n", "d1", now, now + 1_000).await.unwrap());
    assert!(!repos.lease_native("batch-n", "d2", now + 500, now + 1_500).await.unwrap(), "held by d1");
    assert!(repos.lease_native("batch-n", "d1", now + 500, now + 1_500).await.unwrap(), "renewed by its holder");
    assert!(!repos.set_native_batch_id("batch-n", "d2", "prov-1").await.unwrap(), "not d2's");
    assert!(repos.set_native_batch_id("batch-n", "d1", "prov-1").await.unwrap());
    assert!(!repos.set_native_batch_id("batch-n", "d1", "prov-2").await.unwrap(), "stored once");
    assert!(repos.lease_native("batch-n", "d2", now + 2_000, now + 3_000).await.unwrap(), "lapsed: taken over");
    let stored = repos.get_batch("org-1", "batch-n").await.unwrap().unwrap();
    assert_eq!(stored.native_batch_id.as_deref(), Some("prov-1"));
    let pending = repos.pending_items("batch-n", -1, 10).await.unwrap();
    assert_eq!(pending.iter().map(|i| (i.idx, i.custom_id.as_str())).collect::<Vec<_>>(), [(0, "req-0"), (1, "req-1"), (2, "req-2")]);
    assert!(repos.complete_native_item("batch-n", 0, r#"{"ok":0}"#, false).await.unwrap());
    assert!(!repos.complete_native_item("batch-n", 0, r#"{"ok":0}"#, false).await.unwrap(), "done once");
    assert!(repos.complete_native_item("batch-n", 1, r#"{"err":1}"#, true).await.unwrap());
    assert_eq!(repos.pending_items("batch-n", 0, 10).await.unwrap().len(), 1);
    let b = repos.get_batch("org-1", "batch-n").await.unwrap().unwrap();
    assert_eq!((b.completed, b.failed), (1, 1));
    // Falling back: the rest is claimed like any realtime item; the native lease is gone.
    assert!(repos.fall_back_to_realtime("batch-n").await.unwrap());
    assert!(!repos.fall_back_to_realtime("batch-n").await.unwrap());
    assert!(!repos.lease_native("batch-n", "d2", now + 2_000, now + 3_000).await.unwrap(), "no longer native");
    let claimed = repos.claim_items("w2", now, now + 60_000, 100).await.unwrap();
    assert_eq!(claimed.iter().filter(|i| i.batch_id == "batch-n").map(|i| i.idx).collect::<Vec<_>>(), [2]);
}
