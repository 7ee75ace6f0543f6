/*
 * megace dashboard: the fleet model, built from the broker's JSON topics (docs/METRICS.md).
 *
 * No DOM here, so node runs it too (tests/dashboard/test_fleet_js.py). handle() takes one MQTT message
 * and updates the state; anything it cannot read (not JSON, another schema version, a topic outside the
 * layout, a document that names another role, id or site than its topic, a missing field) is counted in
 * state.errors and changes nothing else: a foreign or malformed message never breaks the page.
 */
(function (root) {
  "use strict";

  var ROOT = "megace/v1/";
  var ID = /^[A-Za-z0-9_-]{1,64}$/;
  var HISTORY = 600; // points kept per series: about 20 minutes of 2 s ticks

  function createState() {
    return {
      connected: false,
      messages: 0,
      errors: { count: 0, recent: [] },
      cloud: {},      // id -> {status, metrics, globals: [event data]}
      sites: {},      // site -> {edges: {id -> edge}, devices: {id -> device}}
      globals: [],    // every global event seen, by version: {version, contributors, ts, ...}
      traffic: [],    // {t, up, down}: bytes, summed over edges' latest metrics
      latency: [],    // {t, p50, p99}: the devices' inference round trips (ms)
      rejections: {}, // "cloud:<reason>" or "edge:<class>" -> count (latest totals)
      updated: 0
    };
  }

  function fail(state, topic, why) {
    state.errors.count += 1;
    state.errors.recent.push({ topic: String(topic).slice(0, 200), why: String(why).slice(0, 200) });
    if (state.errors.recent.length > 20) state.errors.recent.shift();
    return false;
  }

  /* "megace/v1/{status|metrics|events}/{role}/[{site}/]{id}" -> {kind, role, site, id}, or null. */
  function parseTopic(topic) {
    if (typeof topic !== "string" || topic.indexOf(ROOT) !== 0) return null;
    var lv = topic.slice(ROOT.length).split("/");
    if (["status", "metrics", "events"].indexOf(lv[0]) < 0) return null;
    if (["device", "edge", "cloud", "broker"].indexOf(lv[1]) < 0) return null;
    if (lv.length === 4) {
      if (!ID.test(lv[2]) || !ID.test(lv[3])) return null;
      return { kind: lv[0], role: lv[1], site: lv[2], id: lv[3] };
    }
    if (lv.length === 3 && ID.test(lv[2])) return { kind: lv[0], role: lv[1], site: null, id: lv[2] };
    return null;
  }

  function decode(payload) {
    if (typeof payload === "string") return JSON.parse(payload);
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(payload));
  }

  function isObj(x) { return x !== null && typeof x === "object" && !Array.isArray(x); }
  function isNum(x) { return typeof x === "number" && isFinite(x); }
  function numOrNull(x) { return x === null || isNum(x); }

  function site(state, name) {
    if (!state.sites[name]) state.sites[name] = { edges: {}, devices: {} };
    return state.sites[name];
  }

  function member(state, p) {
    if (p.role === "cloud" || p.role === "broker") {
      if (!state.cloud[p.id]) state.cloud[p.id] = { id: p.id, role: p.role, status: null, metrics: null };
      return state.cloud[p.id];
    }
    var s = site(state, p.site);
    var group = p.role === "edge" ? s.edges : s.devices;
    if (!group[p.id]) group[p.id] = { id: p.id, site: p.site, status: null, metrics: null, rounds: [], rtt: [] };
    return group[p.id];
  }

  function push(list, item) {
    list.push(item);
    if (list.length > HISTORY) list.shift();
  }

  /* One message. Returns true if it changed the fleet, false if it was refused (and counted). */
  function handle(state, topic, payload, now) {
    now = now === undefined ? Date.now() / 1000 : now;
    state.messages += 1;
    var p = parseTopic(topic);
    if (p === null) return fail(state, topic, "topic outside megace/v1/{status,metrics,events}/role/[site/]id");
    if (payload === null || payload === undefined || payload.length === 0) return false; // a cleared retained topic
    var doc;
    try { doc = decode(payload); } catch (e) { return fail(state, topic, "not JSON"); }
    if (!isObj(doc)) return fail(state, topic, "not a JSON object");
    if (doc.v !== 1) return fail(state, topic, "schema version " + JSON.stringify(doc.v));
    if (doc.role !== p.role || doc.id !== p.id) return fail(state, topic, "role/id differ from the topic");
    if (!isNum(doc.ts)) return fail(state, topic, "no ts");
    if ((p.role === "device" || p.role === "edge") && p.site === null) {
      var legacy = isObj(doc.detail) && typeof doc.detail.site === "string" ? doc.detail.site : null;
      if (legacy === null || !ID.test(legacy)) return fail(state, topic, "no site");
      p.site = legacy; // a pre-site publisher: its status names the site
    }
    var docSite = doc.site !== undefined ? doc.site : (isObj(doc.detail) ? doc.detail.site : undefined);
    if (p.site !== null && docSite !== undefined && docSite !== p.site) return fail(state, topic, "site differs");
    var ok;
    if (p.kind === "status") ok = onStatus(state, p, doc, topic);
    else if (p.kind === "metrics") ok = onMetrics(state, p, doc, topic, now);
    else ok = onEvent(state, p, doc, topic, now);
    if (ok) state.updated = now;
    return ok;
  }

  function onStatus(state, p, doc, topic) {
    if (doc.state !== "online" && doc.state !== "offline") return fail(state, topic, "state is not online/offline");
    if (!isObj(doc.detail)) return fail(state, topic, "no detail");
    member(state, p).status = { state: doc.state, ts: doc.ts, detail: doc.detail };
    return true;
  }

  function onMetrics(state, p, doc, topic, now) {
    var m = doc.metrics;
    if (!isObj(m)) return fail(state, topic, "no metrics map");
    if (p.role === "edge") {
      if (!isNum(m.bytes_up) || !isNum(m.bytes_down)) return fail(state, topic, "edge metrics without bytes");
      member(state, p).metrics = m;
      var up = 0, down = 0;
      eachEdge(state, function (e) {
        if (e.metrics) { up += e.metrics.bytes_up; down += e.metrics.bytes_down; }
      });
      push(state.traffic, { t: now, up: up, down: down });
      if (isObj(m.rejected_by_class)) {
        Object.keys(m.rejected_by_class).forEach(function (k) {
          state.rejections["edge:" + k] = sumEdges(state, k);
        });
      }
    } else if (p.role === "device") {
      var rtt = m.rtt_ms;
      if (!isObj(rtt) || !numOrNull(rtt.p50) || !numOrNull(rtt.p99)) return fail(state, topic, "device metrics without rtt_ms");
      var dev = member(state, p);
      dev.metrics = m;
      if (rtt.p50 !== null) push(dev.rtt, { t: now, p50: rtt.p50, p99: rtt.p99 });
      var p50s = [], p99s = [];
      eachDevice(state, function (d) {
        var r = d.metrics && d.metrics.rtt_ms;
        if (r && r.p50 !== null) { p50s.push(r.p50); p99s.push(r.p99); }
      });
      if (p50s.length) push(state.latency, { t: now, p50: median(p50s), p99: Math.max.apply(null, p99s) });
    } else {
      if (!isNum(m.version)) return fail(state, topic, "cloud metrics without version");
      member(state, p).metrics = m;
      if (isObj(m.rejected_reasons)) {
        Object.keys(m.rejected_reasons).forEach(function (k) { state.rejections["cloud:" + k] = m.rejected_reasons[k]; });
      }
    }
    return true;
  }

  function onEvent(state, p, doc, topic, now) {
    var d = doc.data;
    if (!isObj(d)) return fail(state, topic, "no data");
    if (p.role === "edge" && doc.event === "round") {
      if (!isNum(d.round) || !numOrNull(d.loss)) return fail(state, topic, "round event without round/loss");
      var edge = member(state, p);
      var acc = isNum(d.heldout_acc) ? d.heldout_acc : (isNum(d.train_acc) ? d.train_acc : null);
      var point = { t: doc.ts, round: d.round, loss: d.loss, acc: acc, samples: d.samples, bytes: d.upload_bytes };
      var last = edge.rounds[edge.rounds.length - 1];
      if (last && last.round === d.round) edge.rounds[edge.rounds.length - 1] = point; // a retained repeat
      else push(edge.rounds, point);
      return true;
    }
    if (p.role === "cloud" && doc.event === "global") {
      if (!isNum(d.version) || !Array.isArray(d.contributors)) return fail(state, topic, "global event without version");
      var g = { t: doc.ts, version: d.version, contributors: d.contributors.map(String), strategy: String(d.strategy),
                staleness: d.staleness, norms: d.norms, rejected: d.rejected };
      var i = state.globals.findIndex(function (x) { return x.version === d.version; });
      if (i >= 0) state.globals[i] = g; else { push(state.globals, g); state.globals.sort(function (a, b) { return a.version - b.version; }); }
      if (isObj(d.rejected)) Object.keys(d.rejected).forEach(function (k) { state.rejections["cloud:" + k] = d.rejected[k]; });
      return true;
    }
    return fail(state, topic, "unknown event " + JSON.stringify(doc.event));
  }

  function eachEdge(state, f) { Object.keys(state.sites).forEach(function (s) { Object.values(state.sites[s].edges).forEach(f); }); }
  function eachDevice(state, f) { Object.keys(state.sites).forEach(function (s) { Object.values(state.sites[s].devices).forEach(f); }); }
  function sumEdges(state, k) {
    var n = 0;
    eachEdge(state, function (e) { var r = e.metrics && e.metrics.rejected_by_class; if (r && isNum(r[k])) n += r[k]; });
    return n;
  }
  function median(xs) {
    var s = xs.slice().sort(function (a, b) { return a - b; });
    return s[Math.floor((s.length - 1) / 2)];
  }

  /* A plain summary (the tests and `megace top` compare against it). */
  function summary(state) {
    var out = { cloud: {}, sites: {}, errors: state.errors.count, globals: state.globals.map(function (g) { return g.version; }) };
    Object.keys(state.cloud).forEach(function (id) { out.cloud[id] = state.cloud[id].status ? state.cloud[id].status.state : "unknown"; });
    Object.keys(state.sites).sort().forEach(function (s) {
      var site = state.sites[s], edges = {}, devices = {};
      Object.keys(site.edges).sort().forEach(function (id) {
        var e = site.edges[id];
        edges[id] = { state: e.status ? e.status.state : "unknown", rounds: e.rounds.map(function (r) { return r.round; }) };
      });
      Object.keys(site.devices).sort().forEach(function (id) {
        devices[id] = site.devices[id].status ? site.devices[id].status.state : "unknown";
      });
      out.sites[s] = { edges: edges, devices: devices };
    });
    return out;
  }

  var api = { createState: createState, handle: handle, parseTopic: parseTopic, summary: summary, median: median };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  else root.megaceFleet = api;
})(typeof window !== "undefined" ? window : this);
