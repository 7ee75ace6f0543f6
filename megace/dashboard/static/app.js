/*
 * megace dashboard: connects to the broker over MQTT-over-WebSockets (the vendored mqtt.js), subscribes to
 * the JSON topics read-only (it never publishes), keeps the fleet model of fleet.js and draws it.
 * URL parameters: ?ws=ws://host:port/  (or wss://), &user=NAME (the password is asked in the form).
 */
(function () {
  "use strict";

  var Fleet = window.megaceFleet;
  var FILTERS = ["megace/v1/status/#", "megace/v1/metrics/#", "megace/v1/events/#"];
  var COLORS = ["#2f6fdf", "#e67e22", "#2e9d57", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d", "#d35400"];
  var state = Fleet.createState();
  var client = null;
  var selected = null; // "site/device" shown in the drill-down
  var charts = {};
  var dirty = true;

  window.megace = { state: state, summary: function () { return Fleet.summary(state); }, charts: charts };

  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ------------------------------------------------------------------ connection
  function connect(url, user, password) {
    if (client) client.end(true);
    state.connected = false;
    var opts = { clientId: "megace-dash-" + Math.random().toString(16).slice(2, 10), clean: true,
                 protocolVersion: 4, reconnectPeriod: 2000, connectTimeout: 10000 };
    if (user) { opts.username = user; opts.password = password || ""; }
    client = window.mqtt.connect(url, opts);
    window.megace.client = client; // for tests: a read-only login's publish must be refused by the broker
    client.on("connect", function () {
      state.lastError = null;
      client.subscribe(FILTERS, { qos: 0 }, function (err) {
        state.connected = !err;
        dirty = true;
      });
    });
    client.on("close", function () { state.connected = false; dirty = true; });
    client.on("error", function (err) { state.lastError = String(err && err.message || err); dirty = true; });
    client.on("message", function (topic, payload) {
      try { Fleet.handle(state, topic, payload); } catch (e) { state.errors.count += 1; }
      dirty = true;
    });
  }

  // ------------------------------------------------------------------ fleet tree and drill-down
  function badge(st) {
    var s = st ? st.state : "unknown";
    return el("span", { "class": "badge " + s }, s);
  }

  function renderTree() {
    var root = el("ul", { "class": "tree" });
    Object.keys(state.cloud).sort().forEach(function (id) {
      var c = state.cloud[id], li = el("li", { "class": "node cloud", "data-id": id });
      li.append(el("span", {}, c.role + " " + id + " "), badge(c.status));
      if (c.metrics) li.append(el("span", { "class": "muted" }, " v" + c.metrics.version + " " + (c.metrics.strategy || "")));
      root.append(li);
    });
    var sites = el("ul", { "class": "tree" });
    Object.keys(state.sites).sort().forEach(function (s) {
      var site = state.sites[s], li = el("li", { "class": "node site", "data-site": s }, "site " + s);
      var ul = el("ul", { "class": "tree" });
      Object.keys(site.edges).sort().forEach(function (id) {
        var e = site.edges[id], eli = el("li", { "class": "node edge", "data-id": id });
        eli.append(el("span", {}, "edge " + id + " "), badge(e.status));
        var last = e.rounds[e.rounds.length - 1];
        if (last) eli.append(el("span", { "class": "muted" }, " round " + last.round +
          (last.acc !== null ? " acc " + (100 * last.acc).toFixed(1) + "%" : "")));
        ul.append(eli);
      });
      Object.keys(site.devices).sort().forEach(function (id) {
        var d = site.devices[id], key = s + "/" + id;
        var dli = el("li", { "class": "node device" + (selected === key ? " selected" : ""), "data-id": id, "data-site": s });
        dli.append(el("span", {}, "device " + id + " "), badge(d.status));
        dli.addEventListener("click", function () { selected = key; dirty = true; });
        ul.append(dli);
      });
      li.append(ul);
      sites.append(li);
    });
    root.append(sites);
    $("tree").replaceChildren(root);
  }

  function renderDevice() {
    if (!selected) return;
    var parts = selected.split("/"), site = state.sites[parts[0]], d = site && site.devices[parts[1]];
    if (!d) return;
    var t = el("table", { id: "device-table" });
    function row(k, v) { var tr = el("tr"); tr.append(el("th", {}, k), el("td", {}, v === null || v === undefined ? "–" : String(v))); t.append(tr); }
    row("device", parts[1]); row("site", parts[0]); row("state", d.status ? d.status.state : "unknown");
    var m = d.metrics || {};
    ["queued", "inflight", "dropped", "overflow", "sent", "acked", "requeued", "connects", "disconnects",
     "predictions", "errors_received", "model_version"].forEach(function (k) { row(k, m[k]); });
    var r = m.rtt_ms || {};
    row("rtt p50 / p99 (ms)", r.p50 === undefined || r.p50 === null ? null : r.p50.toFixed(2) + " / " + r.p99.toFixed(2));
    row("last error", m.last_error ? m.last_error.code + ": " + m.last_error.message : null);
    $("device").replaceChildren(t);
    $("device").classList.remove("muted");
  }

  // ------------------------------------------------------------------ charts (uPlot)
  function chart(name, el_, series, xTime) {
    var x = xTime ? { label: "time" } : { label: "round", value: function (u, v) { return v === null ? "--" : String(v); } };
    var opts = { width: Math.max(320, el_.clientWidth || 460), height: 200, scales: { x: { time: !!xTime } },
                 axes: xTime ? [{}, {}] : [{ incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, {}],
                 series: [x].concat(series.map(function (s, i) { return { label: s, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true }; })),
                 legend: { show: true } };
    var data = [[]].concat(series.map(function () { return []; }));
    if (charts[name]) charts[name].destroy();
    charts[name] = new window.uPlot(opts, data, el_);
    charts[name]._labels = series.join("\u0000");
    return charts[name];
  }

  function setSeries(name, target, labels, data, xTime) {
    var c = charts[name];
    if (!c || c._labels !== labels.join("\u0000")) c = chart(name, $(target), labels, xTime);
    c.setData(data);
  }

  function edges() {
    var out = [];
    Object.keys(state.sites).sort().forEach(function (s) {
      Object.keys(state.sites[s].edges).sort().forEach(function (id) { out.push(state.sites[s].edges[id]); });
    });
    return out;
  }

  function byRound(field) {
    var es = edges(), rounds = {};
    es.forEach(function (e) { e.rounds.forEach(function (r) { rounds[r.round] = true; }); });
    var xs = Object.keys(rounds).map(Number).sort(function (a, b) { return a - b; });
    var data = [xs];
    es.forEach(function (e) {
      data.push(xs.map(function (x) {
        var r = e.rounds.find(function (p) { return p.round === x; });
        return r && r[field] !== null ? (field === "acc" ? 100 * r[field] : r[field]) : null;
      }));
    });
    return { labels: es.map(function (e) { return e.id; }), data: data };
  }

  function renderCharts() {
    var acc = byRound("acc"), loss = byRound("loss");
    if (acc.labels.length) {
      setSeries("acc", "c-acc", acc.labels, acc.data);
      setSeries("loss", "c-loss", loss.labels, loss.data);
    }
    if (state.traffic.length) {
      setSeries("traffic", "c-traffic", ["sent by edges (uploads, downlinks)", "received by edges (records, globals)"], [
        state.traffic.map(function (p) { return p.t; }),
        state.traffic.map(function (p) { return p.up / 1e6; }),
        state.traffic.map(function (p) { return p.down / 1e6; })], true);
    }
    if (state.latency.length) {
      setSeries("latency", "c-latency", ["p50 (median device)", "p99 (worst device)"], [
        state.latency.map(function (p) { return p.t; }),
        state.latency.map(function (p) { return p.p50; }),
        state.latency.map(function (p) { return p.p99; })], true);
    }
    if (state.globals.length) {
      setSeries("globals", "c-globals", ["version", "contributors"], [
        state.globals.map(function (g) { return g.t; }),
        state.globals.map(function (g) { return g.version; }),
        state.globals.map(function (g) { return g.contributors.length; })], true);
      var ol = el("ol", { id: "globals", reversed: "" });
      state.globals.slice().reverse().forEach(function (g) {
        ol.append(el("li", { value: String(g.version) }, "v" + g.version + " (" + g.strategy + "): " + g.contributors.join(", ")));
      });
      $("globals").replaceWith(ol);
    }
    var table = el("table", { id: "rejections" }), keys = Object.keys(state.rejections).sort();
    var max = Math.max.apply(null, [1].concat(keys.map(function (k) { return state.rejections[k]; })));
    keys.forEach(function (k) {
      var tr = el("tr"), td = el("td");
      td.append(el("span", { "class": "bar", style: "width:" + Math.round(200 * state.rejections[k] / max) + "px" }),
        el("span", {}, " " + state.rejections[k]));
      tr.append(el("th", {}, k), td);
      table.append(tr);
    });
    if (!keys.length) table.append(el("tr", {}, "none"));
    $("rejections").replaceWith(table);
  }

  function render() {
    if (dirty) {
      dirty = false;
      var conn = $("conn");
      // a refused login (wrong password) shows the broker's answer, e.g. "Connection refused: Not authorized"
      conn.textContent = state.connected ? "connected"
        : "disconnected" + (state.lastError ? ": " + state.lastError : "");
      conn.className = "badge " + (state.connected ? "online" : "offline");
      var e = $("errors");
      e.textContent = state.errors.count + " errors";
      e.className = "badge" + (state.errors.count ? " error-count" : "");
      e.title = state.errors.recent.map(function (x) { return x.topic + ": " + x.why; }).join("\n");
      $("counts").textContent = state.messages + " messages";
      try { renderTree(); renderDevice(); renderCharts(); } catch (err) { state.renderError = String(err); }
    }
    setTimeout(render, 250);
  }

  // ------------------------------------------------------------------ start
  var params = new URLSearchParams(window.location.search);
  var url = params.get("ws") || ("ws://" + (window.location.hostname || "127.0.0.1") + ":9001/");
  $("url").value = url;
  $("user").value = params.get("user") || "";
  $("connect").addEventListener("submit", function (ev) {
    ev.preventDefault();
    connect($("url").value, $("user").value, $("password").value);
  });
  if (params.get("ws") && !params.get("user")) connect(url, "", "");
  render();
})();
