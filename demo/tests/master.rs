//! demo-master as a process: member states, offline/online with task moves, last-worker refusal, Down detection,
// Test code: a failing setup step may panic (clippy only treats `#[test]` functions as tests).
#![allow(clippy::unwrap_used)]
//! leader choice with forwarding, drain test modes and the call log.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn start_master(name: &str, port: u16, peers: &[String]) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["serve", "--listen", &listen, "--name", name, "--tasks", "2"];
    for peer in peers {
        args.push("--peer");
        args.push(peer);
    }
    spawn(master_bin(), &args)
}

async fn member(master: &Proc, name: &str) -> Value {
    let (status, body) = get_json(&format!("{}/api/members/{name}", master.url())).await;
    assert_eq!(status, 200, "GET member {name}: {body}");
    body
}

async fn state_of(master: &Proc, name: &str) -> String {
    member(master, name).await["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Sends heartbeats for fake workers until dropped.
struct FakeWorkers(tokio::task::JoinHandle<()>);

impl FakeWorkers {
    fn start(master_url: String, names: Vec<&'static str>) -> FakeWorkers {
        FakeWorkers(tokio::spawn(async move {
            let client = client();
            loop {
                for name in &names {
                    let body = json!({"name": name, "role": "worker", "addr": format!("127.0.0.1:9{}", name.len()), "version": "v1.0.0"});
                    let _ = client
                        .post(format!("{master_url}/api/members/register"))
                        .json(&body)
                        .send()
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }))
    }
}

impl Drop for FakeWorkers {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test]
async fn real_workers_register_and_tasks_follow_availability() {
    let master = start_master("master-1", 0, &[]);
    let url = master.url();
    let workers: Vec<Proc> = (1..=3)
        .map(|i| {
            spawn(
                worker_bin(),
                &[
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--name",
                    &format!("worker-{i}"),
                    "--master",
                    &url,
                ],
            )
        })
        .collect();
    let members = eventually(WAIT, "3 workers registered", || async {
        let (_, list) = get_json(&format!("{url}/api/members")).await;
        let list = list.as_array()?.clone();
        (list.iter().filter(|m| m["role"] == "worker").count() == 3).then_some(list)
    })
    .await;
    let master_row = members.iter().find(|m| m["name"] == "master-1").unwrap();
    assert_eq!(master_row["state"], "Healthy");
    assert_eq!(master_row["role"], "master");
    let worker_rows: Vec<&Value> = members.iter().filter(|m| m["role"] == "worker").collect();
    assert_eq!(
        worker_rows.iter().filter(|m| m["state"] == "Bound").count(),
        2,
        "2 tasks on 3 workers: {members:?}"
    );
    assert_eq!(
        worker_rows.iter().filter(|m| m["state"] == "Free").count(),
        1
    );
    assert!(worker_rows.iter().all(|m| m["version"] == "v0.1.0"));
    assert_eq!(worker_rows[0]["addr"], workers[0].addr);

    // Take the Bound workers offline: their tasks move to whoever is still available.
    let bound: Vec<String> = worker_rows
        .iter()
        .filter(|m| m["state"] == "Bound")
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    let free = worker_rows.iter().find(|m| m["state"] == "Free").unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = post_json(
        &format!("{url}/api/members/{}/offline", bound[0]),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "Offline");
    assert_eq!(body["tasks"], json!([]));
    assert_eq!(
        state_of(&master, &free).await,
        "Bound",
        "the offline worker's task moved to the free one"
    );
    let (status, _) = post_json(
        &format!("{url}/api/members/{}/offline", bound[1]),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        member(&master, &free).await["tasks"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // The last available worker is refused, with an explanation.
    let (status, body) = post_json(&format!("{url}/api/members/{free}/offline"), json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("last available worker")
    );
    assert_eq!(state_of(&master, &free).await, "Bound");

    // Online again: it gets work back from the worker that held both tasks.
    let (status, body) =
        post_json(&format!("{url}/api/members/{}/online", bound[0]), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["state"], "Bound");
    assert_eq!(
        member(&master, &free).await["tasks"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A worker that stops heartbeating becomes Down and loses its tasks; staying Offline survives a restart.
    let (status, _) = post_json(&format!("{url}/api/members/{free}/offline"), json!({})).await;
    assert_eq!(status, 200, "another worker is available again");
    drop(workers);
    eventually(WAIT, "the remaining online worker goes Down", || async {
        (state_of(&master, &bound[0]).await == "Down").then_some(())
    })
    .await;
    assert_eq!(
        state_of(&master, &free).await,
        "Offline",
        "Offline wins over Down"
    );

    let (status, _) = get_json(&format!("{url}/api/members/nobody")).await;
    assert_eq!(status, 404);
    let (status, _) = post_json(&format!("{url}/api/members/nobody/offline"), json!({})).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn drain_modes_and_call_log() {
    let master = start_master("m", 0, &[]);
    let url = master.url();
    let _workers = FakeWorkers::start(url.clone(), vec!["w-a", "w-b", "w-c"]);
    eventually(WAIT, "fake workers registered", || async {
        let (status, _) = get_json(&format!("{url}/api/members/w-c")).await;
        (status == 200).then_some(())
    })
    .await;
    let (status, _) = client()
        .delete(format!("{url}/api/_test/calls"))
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert_eq!(status.as_u16(), 204);

    let (status, _) = post_json(&format!("{url}/api/_test/drain"), json!({"mode": "refuse"})).await;
    assert_eq!(status, 200);
    let (status, body) = post_json(&format!("{url}/api/members/w-a/offline"), json!({})).await;
    assert_eq!(status, 503, "{body}");
    assert_ne!(state_of(&master, "w-a").await, "Offline");

    post_json(&format!("{url}/api/_test/drain"), json!({"mode": "never"})).await;
    let (status, _) = post_json(&format!("{url}/api/members/w-a/offline"), json!({})).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(
        state_of(&master, "w-a").await,
        "Offline",
        "`never` accepts but never drains"
    );

    post_json(
        &format!("{url}/api/_test/drain"),
        json!({"mode": "delay", "delay_ms": 3000}),
    )
    .await;
    let (status, body) = post_json(&format!("{url}/api/members/w-b/offline"), json!({})).await;
    assert_eq!(status, 200);
    assert_ne!(
        body["state"], "Offline",
        "`delay` answers before the member is drained"
    );
    eventually(WAIT, "delayed offline", || async {
        (state_of(&master, "w-b").await == "Offline").then_some(())
    })
    .await;

    post_json(&format!("{url}/api/_test/drain"), json!({"mode": "normal"})).await;
    post_json(&format!("{url}/api/members/w-b/online"), json!({})).await;
    let (status, _) = post_json(
        &format!("{url}/api/_test/drain"),
        json!({"mode": "sideways"}),
    )
    .await;
    assert_eq!(status, 400);

    let (_, calls) = get_json(&format!("{url}/api/_test/calls")).await;
    let calls = calls.as_array().unwrap();
    let posts: Vec<(String, String)> = calls
        .iter()
        .filter(|c| c["method"] == "POST")
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_string(),
                c["member"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        posts,
        vec![
            ("/api/members/w-a/offline".to_string(), "w-a".to_string()),
            ("/api/members/w-a/offline".to_string(), "w-a".to_string()),
            ("/api/members/w-b/offline".to_string(), "w-b".to_string()),
            ("/api/members/w-b/online".to_string(), "w-b".to_string()),
        ],
        "heartbeats and test controls are not logged; hook calls are, in order"
    );
    let times: Vec<u64> = calls.iter().map(|c| c["at_ms"].as_u64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
    assert!(
        calls
            .iter()
            .any(|c| c["method"] == "GET" && c["member"] == "w-b")
    );
}

#[tokio::test]
async fn smallest_live_master_leads_and_followers_forward() {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let names = ["master-1", "master-2", "master-3"];
    let peer_args = |me: usize| -> Vec<String> {
        (0..3)
            .filter(|i| *i != me)
            .map(|i| format!("{}=http://127.0.0.1:{}", names[i], ports[i]))
            .collect()
    };
    let mut masters: Vec<Option<Proc>> = (0..3)
        .map(|i| Some(start_master(names[i], ports[i], &peer_args(i))))
        .collect();
    let leader_seen_by = |i: usize| format!("http://127.0.0.1:{}/api/leader", ports[i]);

    for i in 0..3 {
        let leader = eventually(WAIT, "all masters agree on master-1", || async {
            let (_, body) = get_json(&leader_seen_by(i)).await;
            (body["leader"] == "master-1").then_some(body)
        })
        .await;
        assert_eq!(leader["addr"], format!("127.0.0.1:{}", ports[0]));
    }

    // Workers heartbeat to every master; an offline through a follower lands on the leader.
    let all_urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let _fakes: Vec<FakeWorkers> = all_urls
        .iter()
        .map(|u| FakeWorkers::start(u.clone(), vec!["w-1", "w-2"]))
        .collect();
    let leader = masters[0].as_ref().unwrap();
    eventually(WAIT, "workers registered", || async {
        let (status, _) = get_json(&format!("{}/api/members/w-2", all_urls[0])).await;
        (status == 200).then_some(())
    })
    .await;
    let (status, body) = post_json(
        &format!("{}/api/members/w-1/offline", all_urls[2]),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(state_of(leader, "w-1").await, "Offline");
    let (_, via_follower) = get_json(&format!("{}/api/members/w-1", all_urls[1])).await;
    assert_eq!(
        via_follower["state"], "Offline",
        "followers answer with the leader's view"
    );
    let (_, calls) = get_json(&format!("{}/api/_test/calls", all_urls[0])).await;
    assert!(
        calls
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["path"] == "/api/members/w-1/offline")
    );

    eventually(WAIT, "the leader sees both peers Healthy", || async {
        let (_, members) = get_json(&format!("{}/api/members", all_urls[0])).await;
        let masters: Vec<&Value> = members
            .as_array()?
            .iter()
            .filter(|m| m["role"] == "master")
            .collect();
        (masters.len() == 3 && masters.iter().all(|m| m["state"] == "Healthy")).then_some(())
    })
    .await;

    // The leader goes away: the next smallest live master leads and reports the old one Down.
    masters[0] = None;
    for i in 1..3 {
        eventually(WAIT, "master-2 takes over", || async {
            let (_, body) = get_json(&leader_seen_by(i)).await;
            (body["leader"] == "master-2").then_some(())
        })
        .await;
    }
    let (_, m1) = get_json(&format!("{}/api/members/master-1", all_urls[2])).await;
    assert_eq!(m1["state"], "Down");
    assert!(masters[1].as_mut().unwrap().terminate().success());
}
