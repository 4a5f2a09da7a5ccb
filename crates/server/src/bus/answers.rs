//! What a node does with the other nodes' messages: the owner's answers (budgets, registration
//! limits, declarations, held copies' acknowledgements, presence, link codes), sign-outs, the
//! strangers' positions, and the devices' checks while the bus is down.

use super::*;

/// Tells the other nodes of the strangers' messages this node's store stored since the last
/// time (after every write that may have stored one).
pub fn share_new_strangers<S: Store>(state: &Shared<S>) {
    let new = state.store.new_strangers();
    if let Some(bus) = state.hub.bus() {
        if !new.is_empty() {
            bus.share_strangers(new);
        }
    }
}

/// Counts the strangers' messages another node's store stored in this node's store's pools.
pub(super) fn strangers_elsewhere<S: Store>(state: &Shared<S>, bus: &Bus, body: &[u8]) {
    let Some(from) = body.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
        return;
    };
    if u64::from_be_bytes(from) == bus.node {
        return;
    }
    let word = |b: &[u8]| <[u8; 8]>::try_from(b).ok().map(i64::from_be_bytes);
    let positions: Vec<(i64, AccountId)> = body[8..]
        .chunks_exact(16)
        .filter_map(|b| Some((word(&b[..8])?, AccountId(word(&b[8..])?))))
        .take(STRANGERS_PER_MESSAGE)
        .collect();
    state.store.strangers_elsewhere(&positions);
}

/// Signs out this node's sessions of the devices in a sign-out from another node.
pub(super) fn signed_out<S: Store>(state: &Shared<S>, body: &[u8]) {
    let Some((&reason, devices)) = body.split_first() else {
        return;
    };
    let reason = SIGN_OUT_REASONS
        .get(usize::from(reason))
        .copied()
        .unwrap_or(SIGN_OUT_REASONS[0]);
    let devices: Vec<DeviceId> = devices
        .chunks_exact(16)
        .filter_map(DeviceId::from_slice)
        .collect();
    state.hub.sign_out(&devices, reason);
}

/// Takes a message for a device this node serves.
pub(super) async fn inbox_message<S: Store>(
    state: &Shared<S>,
    bus: &Bus,
    message: async_nats::Message,
) {
    let body = &message.payload;
    let Some((&kind, rest)) = body.split_first() else {
        return;
    };
    if kind == InboxKind::Budget as u8 {
        return budget_question(state, bus, rest, message.reply.clone()).await;
    }
    if kind == InboxKind::Abuse as u8 {
        let (Some(reply), Some((question, now))) =
            (message.reply.clone(), crate::abuse::Question::parse(rest))
        else {
            return;
        };
        let answer = crate::abuse::answer_here(&state.abuse, &state.config, question, now);
        return answer_owner_question(bus, reply, crate::abuse::answer_to_bytes(answer)).await;
    }
    if kind == InboxKind::Declaration as u8 {
        let (Some(reply), Some(question)) =
            (message.reply.clone(), crate::inbound::Question::parse(rest))
        else {
            return;
        };
        let answer = question.answer_here(&state.declarations);
        return answer_owner_question(bus, reply, answer.to_bytes()).await;
    }
    if kind == InboxKind::HeldAck as u8 {
        // Deciding may wait for a sync: not on the loop that reads the bus.
        let state = Arc::clone(state);
        let client = bus.client.clone();
        let body = message.payload.clone();
        tokio::spawn(async move { held_ack_question(&state, &client, &body, message.reply).await });
        return;
    }
    let Some(device) = rest.get(..16).and_then(DeviceId::from_slice) else {
        return;
    };
    let rest = &rest[16..];
    if kind == InboxKind::HeldDeliver as u8 {
        let Some(origin) = rest.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
            return;
        };
        let Ok(frame) = Frame::decode(&rest[8..]) else {
            return;
        };
        bus.note_held(u64::from_be_bytes(origin), &frame, now_ms());
        state.hub.deliver_here(&device, &frame, 0);
        return;
    }
    match kind {
        k if k == InboxKind::Deliver as u8 || k == InboxKind::Notify as u8 => {
            let Ok(frame) = Frame::decode(rest) else {
                tracing::debug!("a bus frame did not decode");
                return;
            };
            if k == InboxKind::Deliver as u8 {
                state.hub.deliver(&device, &frame);
            } else {
                state.hub.notify(&device, &frame);
            }
        }
        k if k == InboxKind::Presence as u8 => {
            let Some(reply) = message.reply.clone() else {
                return;
            };
            let shown = presence_question(state, device, rest);
            if let Err(e) = bus
                .client
                .publish(reply, Bytes::from_static(if shown { &[1] } else { &[0] }))
                .await
            {
                tracing::debug!(error = %e, "a presence answer was not published");
            }
        }
        _ => tracing::debug!("an unknown bus message"),
    }
}

/// Hands over a link offer this node holds to the node a new device reached, removing it here;
/// says nothing when it holds no such offer (the node that holds it answers).
pub(super) async fn link_question<S: Store>(
    state: &Shared<S>,
    bus: &Bus,
    message: async_nats::Message,
) {
    let body = &message.payload;
    let (Some(reply), Some(hash), Some(account), Some(now)) = (
        message.reply.clone(),
        body.get(..32).and_then(|b| <[u8; 32]>::try_from(b).ok()),
        body.get(32..40).and_then(|b| <[u8; 8]>::try_from(b).ok()),
        body.get(40..48).and_then(|b| <[u8; 8]>::try_from(b).ok()),
    ) else {
        return;
    };
    let (account, now) = (
        AccountId(i64::from_be_bytes(account)),
        u64::from_be_bytes(now),
    );
    let offer = {
        let Ok(mut offers) = state.link_offers.lock() else {
            return;
        };
        match offers.get(&hash) {
            Some(offer) if offer.account == account && offer.expires_at > now => {
                offers.remove(&hash)
            }
            _ => None,
        }
    };
    if let Some(offer) = offer {
        let mut answer = BytesMut::with_capacity(24);
        answer.put_slice(&offer.approver.0);
        answer.put_u64(offer.expires_at);
        if let Err(e) = bus.client.publish(reply, answer.freeze()).await {
            tracing::debug!(error = %e, "a link offer was not handed over");
        }
    }
}

/// Decides an acknowledgement, made at another node, of a copy this node holds, and answers.
async fn held_ack_question<S: Store>(
    state: &Shared<S>,
    client: &async_nats::Client,
    body: &[u8],
    reply: Option<async_nats::Subject>,
) {
    let (Some(reply), Some(device), Some(sender_device), Some(id), Some(kind)) = (
        reply,
        body.get(1..17).and_then(DeviceId::from_slice),
        body.get(17..33).and_then(DeviceId::from_slice),
        body.get(33..49).and_then(MessageId::from_slice),
        body.get(49).copied().and_then(ack_kind),
    ) else {
        return;
    };
    let acked = crate::delivery::ack_held(state, device, sender_device, id, kind).await;
    let answer = HeldAnswer::of(acked.as_ref()) as u8;
    if let Err(e) = client
        .publish(reply, Bytes::copy_from_slice(&[answer]))
        .await
    {
        tracing::debug!(error = %e, "an acknowledgement's decision was not published");
    }
}

/// Publishes an owner's answer to a question from another node.
async fn answer_owner_question(bus: &Bus, reply: async_nats::Subject, answer: Vec<u8>) {
    if let Err(e) = bus.client.publish(reply, answer.into()).await {
        tracing::debug!(error = %e, "an owner's answer was not published");
    }
}

/// Charges a budget this node owns for another node, and answers.
async fn budget_question<S: Store>(
    state: &Shared<S>,
    bus: &Bus,
    body: &[u8],
    reply: Option<async_nats::Subject>,
) {
    let (Some(reply), Some(budget), Some(key), Some(units), Some(now)) = (
        reply,
        body.first().copied().and_then(Budget::from_byte),
        body.get(1..33).and_then(|b| <[u8; 32]>::try_from(b).ok()),
        body.get(33..37).and_then(|b| <[u8; 4]>::try_from(b).ok()),
        body.get(37..45).and_then(|b| <[u8; 8]>::try_from(b).ok()),
    ) else {
        return;
    };
    // Sends taken ahead for the asking node (absent from an older node's question: none).
    let more = body
        .get(45..49)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_be_bytes);
    let taken = crate::budget::take_here(
        state,
        budget,
        BudgetKey::from_bytes(key),
        u32::from_be_bytes(units),
        more,
        u64::from_be_bytes(now),
    );
    let mut answer = Vec::with_capacity(9);
    match taken {
        Ok(granted) => {
            answer.put_u8(0);
            answer.put_u32(granted);
        }
        Err(wait) => {
            answer.put_u8(1);
            answer.put_u64(wait);
        }
    }
    answer_owner_question(bus, reply, answer).await;
}

/// Answers a presence question about a device this node serves.
fn presence_question<S: Store>(state: &Shared<S>, device: DeviceId, rest: &[u8]) -> bool {
    let Some(asker) = rest.get(..16).and_then(DeviceId::from_slice) else {
        return false;
    };
    let (proof, rest) = match rest.get(16) {
        Some(1) => match rest
            .get(17..49)
            .and_then(|mac| <[u8; 32]>::try_from(mac).ok())
        {
            Some(mac) => (vec![(device, mac)], &rest[49..]),
            None => return false,
        },
        Some(0) => (Vec::new(), &rest[17..]),
        _ => return false,
    };
    let Some(now) = rest.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
        return false;
    };
    state
        .hub
        .count_visible(&[device], asker, &proof, u64::from_be_bytes(now))
        > 0
}

/// Signs out this node's sessions whose device is no longer registered: a sign-out published
/// while the bus was down never arrived.
pub(super) async fn check_devices<S: Store>(state: &Shared<S>) {
    for device in state.hub.devices() {
        if let Ok(backlog) = state.store.backlog(device).await {
            if !backlog.registered {
                state.hub.sign_out(
                    &[device],
                    "this device is no longer registered (removed, replaced or disabled)",
                );
            }
        }
    }
}

/// How many of these devices show themselves online to the device `asker` (see
/// [`Hub::count_visible`]), wherever they are served.
pub async fn count_visible(
    hub: &Hub,
    devices: &[DeviceId],
    asker: DeviceId,
    proofs: &[(DeviceId, Secret)],
    now: Millis,
) -> usize {
    visible(hub, devices, asker, proofs, now).await.len()
}

/// Which of these devices show themselves online to the device `asker` (see
/// [`Hub::count_visible`]), wherever they are served: a device with no listening session here is
/// asked about at the node that serves it, if another one does.
pub async fn visible(
    hub: &Hub,
    devices: &[DeviceId],
    asker: DeviceId,
    proofs: &[(DeviceId, Secret)],
    now: Millis,
) -> Vec<DeviceId> {
    let mut shown: Vec<DeviceId> = devices
        .iter()
        .filter(|device| hub.count_visible(std::iter::once(*device), asker, proofs, now) > 0)
        .copied()
        .collect();
    let Some(bus) = hub.bus() else {
        return shown;
    };
    let elsewhere: Vec<DeviceId> = devices
        .iter()
        .filter(|device| !hub.is_online(device) && bus.node_of(device).is_some())
        .copied()
        .collect();
    let answers = futures::future::join_all(elsewhere.iter().map(|device| {
        let proof = proofs
            .iter()
            .find(|(proven, _)| proven == device)
            .map(|(_, mac)| mac);
        bus.shows_online(*device, asker, proof, now)
    }))
    .await;
    shown.extend(
        elsewhere
            .into_iter()
            .zip(answers)
            .filter_map(|(device, yes)| yes.then_some(device)),
    );
    shown
}

/// Whether every one of these devices holds a listening session, here or at another node.
pub fn all_listening(hub: &Hub, devices: &[DeviceId]) -> bool {
    devices.iter().all(|device| {
        hub.is_online(device) || hub.bus().is_some_and(|bus| bus.node_of(device).is_some())
    })
}
