//! Issue 31: several nodes over one PostgreSQL and one NATS. Users reach different nodes; a copy,
//! a receipt, a presence question and a link code cross between them over the bus.

use std::collections::BTreeMap;

use crate::support::{
    eventually, nats_url, number, patience, Listener, NatsServer, Server, TempDatabase, User,
    PATIENCE,
};

/// `count` nodes over a database of their own and NATS subjects of their own, on the machine's
/// NATS server.
fn cluster(count: usize) -> (TempDatabase, Vec<Server>) {
    cluster_on(&nats_url(), count, &[])
}

/// [`cluster`] on the NATS server at `nats`.
fn cluster_on(nats: &str, count: usize, extra: &[&str]) -> (TempDatabase, Vec<Server>) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CLUSTERS: AtomicU32 = AtomicU32::new(0);
    let prefix = format!(
        "it{}x{}",
        std::process::id(),
        CLUSTERS.fetch_add(1, Ordering::Relaxed)
    );
    let database = TempDatabase::create();
    let first = Server::start_node_on(nats, &database, &prefix, None, extra);
    let mut nodes = vec![first];
    for _ in 1..count {
        let node = Server::start_node_on(nats, &database, &prefix, Some(&nodes[0]), extra);
        nodes.push(node);
    }
    (database, nodes)
}

#[test]
fn users_on_different_nodes_talk_see_each_other_and_link_devices() {
    let (_database, nodes) = cluster(3);
    let alice = User::register(&number(), &nodes[0], &[]);
    let bob = User::register(&number(), &nodes[1], &[]);

    // Bob writes to Alice (stored, read at her node), which makes him her contact.
    let (answer, code) = bob.send(&alice.number, "hello from node 2", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(alice.receive_texts(1, PATIENCE), vec!["hello from node 2"]);

    // Bob listens at node 2; Alice, at node 1, sees him online: the question crossed the bus.
    let bob_listening = Listener::start(&bob);
    assert!(
        eventually(patience(), || alice.lookup(&[&bob.number])[0].1 == "online"),
        "alice never saw bob online across nodes"
    );

    // A message to a device listening on another node is pushed to it at once, and its
    // receipt comes back across the bus.
    let wait = PATIENCE.to_string();
    let (answer, code) = alice.send(&bob.number, "across the bus", &["--wait", &wait]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(answer["outcome"], "accepted", "{answer}");
    assert_eq!(answer["receipt"], "delivered", "{answer}");
    let shown = bob_listening.wait_for(|e| e["type"] == "message");
    assert_eq!(shown["text"], "across the bus", "{shown}");
    // Deliver first across nodes: the copy was pushed from node 1's memory to node 2 and its
    // acknowledgement decided back at node 1, with no copy written.
    assert!(
        eventually(patience(), || gauge(
            &nodes[0],
            r#"tidings_held_copies_total{outcome="decided"}"#
        ) >= 1),
        "the copy for a device on another node was not delivered first"
    );
    assert_eq!(
        gauge(&nodes[0], r#"tidings_held_copies_total{outcome="stored"}"#),
        -1
    );

    // Bob stops: Alice sees him offline once his node said so.
    drop(bob_listening);
    assert!(
        eventually(patience(), || alice.lookup(&[&bob.number])[0].1
            == "offline"),
        "alice still saw bob online after he stopped"
    );

    // A code Alice asks for at node 1 links a device that reaches node 3.
    let alice_too = alice.link_device_via(&nodes[2].url);
    let (answer, code) = bob.send(&alice.number, "to both of you", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(alice.receive_texts(1, PATIENCE), vec!["to both of you"]);
    assert_eq!(alice_too.receive_texts(1, PATIENCE), vec!["to both of you"]);
}

/// The body of `GET /v1/ready` at `node`, with its status code.
fn ready(node: &Server) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            &format!("{}/v1/ready", node.url),
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The gauge `name` in `/metrics` at `node` (-1 if it is not there).
fn gauge(node: &Server, name: &str) -> i64 {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            &format!("http://127.0.0.1:{}/metrics", node.metrics_port),
        ])
        .output()
        .expect("curl");
    let prefix = format!("{name} ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()).map(str::to_string))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(-1)
}

fn sessions_active(node: &Server) -> i64 {
    gauge(node, "tidings_sessions_active")
}

/// The other nodes `node` hears from.
fn bus_nodes(node: &Server) -> i64 {
    gauge(node, "tidings_bus_nodes")
}

#[test]
fn nothing_accepted_is_lost_while_the_bus_is_stopped_and_restarted() {
    let mut nats = NatsServer::start();
    let (_database, nodes) = cluster_on(&nats.url(), 2, &[]);
    let alice = User::register(&number(), &nodes[0], &[]);
    let bob = User::register(&number(), &nodes[1], &[]);
    let bob_listening = Listener::start(&bob);
    assert!(eventually(patience(), || ready(&nodes[0]).0 == 200));
    let (answer, code) = alice.send(&bob.number, "before", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(
        bob_listening.wait_for(|e| e["type"] == "message")["text"],
        "before"
    );

    nats.stop();
    // Told plainly: the node is not ready, and a send's answer says why it was queued.
    assert!(
        eventually(patience(), || ready(&nodes[0]).0 == 503),
        "the node still said it was ready with its bus down"
    );
    assert!(ready(&nodes[0]).1.contains("bus_down"));
    let mut accepted = Vec::new();
    for i in 0..3 {
        let text = format!("while down {i}");
        let (answer, code) = alice.send(&bob.number, &text, &["--route", "ip-only"]);
        assert_eq!(code, 0, "{answer}");
        assert_eq!(answer["outcome"], "queued", "{answer}");
        assert!(
            answer["detail"]
                .as_str()
                .is_some_and(|d| d.contains("cannot reach its other nodes")),
            "{answer}"
        );
        accepted.push(text);
    }

    nats.resume();
    // Everything queued while the bus was down reaches the listening device once it is back,
    // each message once.
    let mut shown = Vec::new();
    while shown.len() < accepted.len() {
        let event = bob_listening.wait_for(|e| e["type"] == "message");
        shown.push(event["text"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(shown, accepted);
    assert!(eventually(patience(), || ready(&nodes[0]).0 == 200));
    drop(bob_listening);
    assert!(bob.receive(1, 2).is_empty(), "a message was shown twice");
}

#[test]
fn a_device_removed_while_the_bus_is_down_is_signed_out_on_its_node() {
    let mut nats = NatsServer::start();
    let (_database, nodes) = cluster_on(&nats.url(), 2, &[]);
    let alice = User::register(&number(), &nodes[0], &[]);
    let bob = User::register(&number(), &nodes[1], &[]);
    let second = alice.link_device_via(&nodes[1].url);
    let second_id = second.device_id();
    let mut second_listening =
        second.spawn(&["--json", "listen", "--timeout", &(4 * PATIENCE).to_string()]);
    // The second device's session lives on node 2 before the bus goes down.
    assert!(eventually(patience(), || sessions_active(&nodes[1]) == 1));

    nats.stop();
    alice.ok(&["devices", "--remove", &second_id]);
    // The sign-out node 1 published is lost; node 2 finds the removal in the database.
    let exited = eventually(patience(), || {
        matches!(second_listening.try_wait(), Ok(Some(_)))
    });
    let _ = second_listening.kill();
    let out = second_listening.wait_with_output().expect("listener");
    assert!(exited, "the removed device's session stayed open on node 2");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("no longer registered") || said.contains("removed"),
        "{said}"
    );
    // And afterwards it can do nothing, on either node.
    let (answer, code) = second.send(
        &bob.number,
        "from a removed device",
        &["--route", "ip-only"],
    );
    assert_ne!(code, 0, "{answer}");
    nats.resume();
    assert!(second.run(&["devices"]).status.code() != Some(0));
}

#[test]
fn a_node_killed_mid_flow_loses_no_message_and_its_clients_move_on() {
    let (_database, mut nodes) = cluster(3);
    let urls = |a: usize, b: usize| format!("{},{}", nodes[a].url, nodes[b].url);
    let alice = User::register_via(&number(), &nodes[0], &urls(0, 1), &[]);
    let bob = User::register_via(&number(), &nodes[1], &urls(1, 2), &[]);
    // Bob shows himself to Alice: she wrote to him first.
    let (answer, code) = alice.send(&bob.number, "hello", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    let alice_listening = Listener::start(&alice);
    let bob_listening = Listener::start(&bob);
    assert_eq!(
        bob_listening.wait_for(|e| e["type"] == "message")["text"],
        "hello"
    );

    let mut accepted = Vec::new();
    for i in 0..20 {
        if i == 8 {
            nodes[0].kill9();
        }
        let text = format!("flow {i}");
        let (answer, code) = alice.send(&bob.number, &text, &["--route", "ip-only"]);
        // Accepted by her client: sent, or kept for `listen` to send again.
        if code == 0 || answer["id"].is_string() {
            accepted.push(text);
        }
    }
    assert!(accepted.len() >= 19, "{accepted:?}");
    let mut shown = BTreeMap::<String, usize>::new();
    let want: Vec<&String> = accepted.iter().collect();
    let deadline = std::time::Instant::now() + patience();
    while want.iter().any(|text| !shown.contains_key(*text)) && std::time::Instant::now() < deadline
    {
        let event = bob_listening.wait_for(|e| e["type"] == "message");
        *shown
            .entry(event["text"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    for text in &accepted {
        assert_eq!(
            shown.get(text),
            Some(&1),
            "{text} shown {:?} times: {shown:?}",
            shown.get(text)
        );
    }
    // Lookups stay right: Alice's listen moved to node 2, and Bob sees her online there.
    drop(alice_listening);
    let alice_listening = Listener::start(&alice);
    assert!(
        eventually(patience(), || bob.lookup(&[&alice.number])[0].1 == "online"),
        "bob never saw alice online after her node died"
    );
    drop(alice_listening);
    drop(bob_listening);
    assert!(bob.receive(1, 2).is_empty(), "a message was shown twice");
}

#[test]
fn an_account_spread_over_every_node_draws_from_one_lookup_budget() {
    // A lookup of a number not asked before costs two: its evaluation and the lookup.
    let (_database, nodes) = cluster_on(
        &nats_url(),
        3,
        &["--lookup-burst", "6", "--lookup-per-hour", "1"],
    );
    let alice = User::register(&number(), &nodes[0], &[]);
    let devices = [
        alice.link_device_via(&nodes[1].url),
        alice.link_device_via(&nodes[2].url),
    ];
    // Every node knows the others before the budget is used.
    assert!(eventually(patience(), || nodes
        .iter()
        .all(|node| bus_nodes(node) == 2)));
    let mut granted = 0;
    for device in devices.iter().chain(std::iter::once(&alice)) {
        for _ in 0..4 {
            let out = device.run(&["--json", "lookup", &number()]);
            if !out.status.success() {
                let said = String::from_utf8_lossy(&out.stdout).to_string();
                assert!(
                    said.contains("budget"),
                    "refused for another reason: {said}"
                );
                break;
            }
            granted += 1;
        }
    }
    assert!(granted >= 1, "no lookup was granted");
    assert!(
        granted <= 3,
        "{granted} lookups were granted over three nodes with one budget of three"
    );
}

#[test]
fn a_bus_with_a_password_takes_only_nodes_that_give_it() {
    let nats = NatsServer::start_with(&["--user", "tidings", "--pass", "bus-secret"]);
    let with_password = format!("nats://tidings:bus-secret@127.0.0.1:{}", nats.port);
    let (_database, nodes) = cluster_on(&with_password, 1, &[]);
    assert!(
        eventually(patience(), || ready(&nodes[0]).0 == 200),
        "a node with the bus's password never got ready"
    );
    let wrong = format!("nats://tidings:wrong@127.0.0.1:{}", nats.port);
    let (_other_database, others) = cluster_on(&wrong, 1, &[]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (status, body) = ready(&others[0]);
    assert_eq!(status, 503, "{body}");
    assert!(!others[0].log().contains("bus-secret") && !others[0].log().contains(":wrong@"));
}

/// The registration limits and SMS budgets are one for the deployment: code requests from one
/// address spread over three nodes get what one node would give them, and so do codes to many
/// numbers against the SMS budget of all codes per hour. Each node keeping its own tables let
/// three times as many through.
#[test]
fn registration_limits_spread_over_every_node_are_one() {
    use crate::limits::request_code;
    let (_database, nodes) = cluster_on(
        &nats_url(),
        3,
        &["--codes-per-address", "3", "--codes-per-hour", "4"],
    );
    assert!(eventually(patience(), || nodes
        .iter()
        .all(|node| bus_nodes(node) == 2)));
    let accepted = |from: &dyn Fn(usize) -> [u8; 4]| -> usize {
        (0..9)
            .filter(|i| {
                let answer = request_code(&nodes[i % 3], from(*i), None, &number());
                assert!(
                    answer.status == 202 || answer.status == 429,
                    "status {}",
                    answer.status
                );
                answer.status == 202
            })
            .count()
    };
    // Nine requests from one address, three at each node: three in all.
    assert_eq!(accepted(&|_| [127, 0, 0, 1]), 3);
    // Nine from nine addresses: the budget of all codes has one left.
    let others = |i: usize| [127, 0, 0, 11 + u8::try_from(i).expect("small")];
    assert_eq!(accepted(&others), 1);
}

/// Registration by own SMS holds whichever node each step reaches: the number declared at one
/// node, its SMS handed in at another (where the operator's gateway calls), the registration
/// completed at a third. Each node kept its own declarations, so the SMS found none.
#[test]
fn a_number_declared_at_one_node_is_proven_by_an_sms_at_another_and_completed_at_a_third() {
    use crate::own_sms::{complete, declare, inbound_args, query_value, SERVICE};
    let args = inbound_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_database, nodes) = cluster_on(&nats_url(), 3, &args);
    assert!(eventually(patience(), || nodes
        .iter()
        .all(|node| bus_nodes(node) == 2)));
    let n = number();
    let (code, text) = declare(&nodes[0], &n);
    let path = format!(
        "/v1/sms/inbound?from={}&to={}&text={}",
        query_value(&n),
        query_value(SERVICE),
        query_value(&text)
    );
    let (status, _) = crate::operations::get(nodes[1].metrics_port, &path);
    assert_eq!(status, 200);
    let (status, answer) = complete(&nodes[2], &n, &code);
    assert_eq!(status, 200, "{answer}");
}

/// A receiver device's stranger pool is one whichever nodes the strangers reach: three strangers,
/// each on its own node, fill the pool of six once. Each node counting only the strangers' copies
/// its own store had stored let every node fill it anew.
#[test]
fn strangers_spread_over_every_node_fill_one_pool() {
    use tidings_proto::frame::SendOutcome;
    let (_database, nodes) = cluster_on(&nats_url(), 3, &["--stranger-pool-copies", "6"]);
    assert!(eventually(patience(), || nodes
        .iter()
        .all(|node| bus_nodes(node) == 2)));
    let victim_number = number();
    let victim = User::register(&victim_number, &nodes[0], &[]);
    let victim_device = victim.client().device();
    let mut outcomes = Vec::new();
    for node in &nodes {
        let stranger = User::register(&number(), node, &[]);
        outcomes.extend(crate::support::block_on(crate::queues::answers(
            &stranger.client(),
            &victim_number,
            &[victim_device],
            3,
            100,
        )));
        // Told to the other nodes once stored: a stranger racing it on another node within a
        // bus message's time could still slip one in.
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let codes: Vec<i32> = outcomes.iter().map(|a| a.outcome).collect();
    let queued = codes
        .iter()
        .filter(|c| **c == SendOutcome::Queued as i32)
        .count();
    assert_eq!(queued, 6, "{codes:?}");
    assert!(
        codes.iter().all(|c| *c == SendOutcome::Queued as i32
            || *c == SendOutcome::RefusedStrangerPoolFull as i32),
        "{codes:?}"
    );
}
