/* edgeopt dashboard page behaviour: charts fed by the app's JSON API, range pickers, live deployment
 * progress. Pages work without this file (tables are server-rendered); it adds the charts and polling. */
(function () {
  "use strict";
  var COLORS = {p50: "#2456c9", p95: "#d9822b", p99: "#c23030"};
  var PALETTE = ["#2456c9", "#d9822b", "#c23030", "#1c8a4a", "#7a4bc2", "#0f8a9c"];

  var inflight = {};

  /* One request per URL at a time: the device page's six charts share one series answer. */
  function getJSON(url) {
    if (!inflight[url]) {
      inflight[url] = fetchJSON(url);
      var clear = function () { delete inflight[url]; };
      inflight[url].then(clear, clear);
    }
    return inflight[url];
  }

  function fetchJSON(url) {
    return fetch(url, {headers: {"Accept": "application/json"}, credentials: "same-origin"}).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok) throw new Error(body.message || ("HTTP " + r.status));
        return body;
      });
    });
  }

  function withParam(url, key, value) {
    var u = new URL(url, window.location.origin);
    if (value) u.searchParams.set(key, value); else u.searchParams.delete(key);
    return u.pathname + u.search;
  }

  /* <div class="chart" data-src="/api/v1/..." data-fields="p50_ms:p50,p95_ms:p95" data-unit="ms">; a field may
   * carry a factor, "kv_cache_usage:use:100", for a share (0..1) drawn as a percentage. */
  function loadChart(el, range) {
    var src = el.getAttribute("data-src");
    if (range) src = withParam(src, "range", range);
    el.setAttribute("data-state", "loading");
    return getJSON(src).then(function (body) {
      var kind = el.getAttribute("data-kind") || "line", unit = el.getAttribute("data-unit") || "";
      if (kind === "bars") {
        var obj = body[el.getAttribute("data-key")] || {}, keys = Object.keys(obj).sort(function (a, b) { return (+a) - (+b); });
        EdgeCharts.bars(el, {labels: keys, values: keys.map(function (k) { return obj[k]; }), unit: unit});
      } else {
        var fields = (el.getAttribute("data-fields") || "").split(",").filter(Boolean);
        var series = fields.map(function (spec, i) {
          var parts = spec.split(":"), key = parts[0], name = parts[1] || key, factor = parts[2] ? +parts[2] : 1;
          return {
            name: name, color: COLORS[name] || PALETTE[i % PALETTE.length],
            points: (body.points || []).map(function (p) {
              var v = p[key];
              return [Date.parse(p.t), v === undefined || v === null ? null : v * factor];
            })
          };
        });
        var card = el.closest(".card"), h = card && card.querySelector("h2");
        var opts = {series: series, unit: unit, bands: el.hasAttribute("data-bands"),
                    logToggle: el.hasAttribute("data-log-toggle"), title: h ? h.textContent : "",
                    emptyText: el.getAttribute("data-empty") || undefined,
                    csv: withParam(src, "format", "csv"),
                    markers: el.hasAttribute("data-markers-src") ? (body.markers || []).map(function (mk) {
                      return {t: Date.parse(mk.t), label: mk.label};
                    }) : []};
        if (body.start && body.end) { opts.xMin = Date.parse(body.start); opts.xMax = Date.parse(body.end); }
        EdgeCharts.line(el, opts);
      }
      el.setAttribute("data-state", "ready");
    }).catch(function (err) {
      el.setAttribute("data-state", "error");
      el.textContent = "chart unavailable: " + err.message;
    });
  }

  function initCharts() {
    document.querySelectorAll(".chart[data-src]").forEach(function (el) { loadChart(el); });
    document.querySelectorAll(".range-picker").forEach(function (picker) {
      picker.addEventListener("click", function (ev) {
        var b = ev.target.closest("button[data-range]");
        if (!b) return;
        picker.querySelectorAll("button").forEach(function (x) { x.classList.toggle("active", x === b); });
        var scope = document.querySelector(picker.getAttribute("data-target")) || document;
        scope.querySelectorAll(".chart[data-src]").forEach(function (el) {
          el.setAttribute("data-src", withParam(el.getAttribute("data-src"), "range", b.getAttribute("data-range")));
          loadChart(el);
        });
      });
    });
  }

  function esc(s) {
    return String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }

  /* Deployment page: <section data-poll="/api/v1/deployments/7"> refreshed every 2 s while running. */
  function initDeploymentPoll() {
    var box = document.querySelector("[data-poll]");
    if (!box) return;
    var url = box.getAttribute("data-poll");
    function render(d) {
      var set = function (sel, v) { var n = box.querySelector(sel); if (n) n.textContent = v; };
      set("[data-field=status]", d.state);
      var badge = box.querySelector("[data-field=status]");
      if (badge) badge.className = "badge " + d.state;
      set("[data-field=stage]", d.stage_label);
      set("[data-field=error]", d.message || "");
      var msg = box.querySelector("#deployment-message");
      if (msg) { msg.hidden = !d.message; msg.classList.toggle("error", d.state === "failed"); }
      var c = d.counts || {}, total = d.total || 1;
      c.running = c.in_flight;
      ["succeeded", "failed", "running", "pending"].forEach(function (k) { set("[data-count=" + k + "]", c[k] || 0); });
      var bar = box.querySelector(".progress");
      if (bar) {
        bar.innerHTML = '<span class="ok"></span><span class="bad"></span><span class="run"></span>';
        bar.children[0].style.width = (100 * (c.succeeded || 0) / total) + "%";
        bar.children[1].style.width = (100 * (c.failed || 0) / total) + "%";
        bar.children[2].style.width = (100 * (c.running || 0) / total) + "%";
      }
      var tbody = box.querySelector("tbody[data-targets]");
      if (tbody && d.targets) {
        tbody.innerHTML = d.targets.map(function (t) {
          return "<tr><td><a href=\"/devices/" + encodeURIComponent(t.device_id) + "\">" + esc(t.device_id) + "</a></td>" +
            "<td>" + esc(t.stage) + "</td><td><span class=\"badge " + esc(t.state) + "\">" + esc(t.state) + "</span></td>" +
            "<td>" + esc(t.message) + "</td><td class=\"mono\">" + esc(t.updated_at ? t.updated_at.replace("T", " ").slice(0, 19) : "") + "</td></tr>";
        }).join("");
      }
      box.setAttribute("data-status", d.state);
      return d.active;
    }
    function tick() {
      getJSON(url).then(function (d) { if (render(d)) setTimeout(tick, 2000); }).catch(function () { setTimeout(tick, 5000); });
    }
    tick();
  }

  document.addEventListener("DOMContentLoaded", function () {
    initCharts();
    initDeploymentPoll();
  });
})();
