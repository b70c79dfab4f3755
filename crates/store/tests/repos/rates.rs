//! Shared rate windows: claims never pass the limit, carry the previous window, and grant exactly
//! the limit to concurrent claimers.

use marga_store::RateClaim;

use crate::backend::Ctx;
use crate::fixtures::claim;

pub(crate) async fn rate_claims_never_pass_the_limit_and_carry_the_previous_window(ctx: &Ctx) {
    let repos = &*ctx.repos;
    let w = 1_800_000_000_000;
    let first = repos.claim_rate(&claim("k:a:m", w, 10, 4)).await.unwrap();
    assert_eq!((first.granted, first.count, first.carried), (4, 4, 0));
    let second = repos.claim_rate(&claim("k:a:m", w, 10, 8)).await.unwrap();
    assert_eq!((second.granted, second.count), (6, 10), "only what is left");
    assert_eq!(repos.claim_rate(&claim("k:a:m", w, 10, 1)).await.unwrap().granted, 0);
    assert_eq!(repos.claim_rate(&claim("k:b:m", w, 10, 1)).await.unwrap().granted, 1, "scopes are separate");
    // The next minute, 30 % into it: 70 % of the previous 10 still weighs.
    let next = RateClaim { carry_ppm: 700_000, ..claim("k:a:m", w + 60_000, 10, 10) };
    let grant = repos.claim_rate(&next).await.unwrap();
    assert_eq!((grant.granted, grant.carried), (3, 7));
    let daily = RateClaim { previous_start_ms: None, ..claim("k:a:d", w, 2, 5) };
    assert_eq!(repos.claim_rate(&daily).await.unwrap().granted, 2);
    assert_eq!(repos.prune_rate_windows(w + 1).await.unwrap(), 3, "the first minute of both scopes, and the day");
    assert_eq!(repos.claim_rate(&claim("k:a:m", w, 10, 10)).await.unwrap().granted, 10, "a pruned window starts over");
}

pub(crate) async fn concurrent_rate_claims_grant_exactly_the_limit(ctx: &Ctx) {
    let w = 1_800_000_000_000;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let repos = ctx.repos.clone();
            tokio::spawn(async move { repos.claim_rate(&claim("k:race:m", w, 50, 1 + i % 3)).await.unwrap().granted })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, 50, "40 claims of 1 to 3 ask for 79; exactly the limit is granted");
}
