/* edgeopt charts: time series drawn by uPlot (static/vendor/uplot, served by the app: no CDN, works offline),
 * plus a small SVG bar chart for distributions.
 *
 * EdgeCharts.line(el, {series: [{name, color, points: [[timeMs, value], ...]}], unit, xMin, xMax,
 *                      bands, log, markers: [{t: timeMs, label}], sync})
 *   - time axis with uPlot's calendar-aware ticks; drag across the plot to zoom, "Reset zoom" (or a
 *     double click) to go back; the cursor is shared by every chart of the page (``sync`` key) and the
 *     legend under each chart reads out every series at the cursor;
 *   - ``bands``: the p50..p95 and p95..p99 ranges filled (latency charts); ``log``: logarithmic y axis,
 *     ``logToggle``: a "log scale" checkbox that redraws the chart with it;
 *   - ``csv``: a link to the chart's data as CSV (the API answers ``format=csv``);
 *   - ``markers``: dashed vertical lines where a version changed (deployments, switches, rollbacks);
 *   - for screen readers: a text summary (aria-label and a visually hidden paragraph) and the data as a
 *     table in a <details> element, which sighted users can open too.
 *   Attributes for scripts and tests: data-points (values drawn), data-x-min / data-x-max (the visible
 *   range, epoch seconds), data-zoomed, data-log, data-markers, data-readout (the legend's text at the cursor).
 * EdgeCharts.bars(el, {labels: [...], values: [...], unit})
 */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var M = {top: 12, right: 14, bottom: 26, left: 56};
  var SYNC = "edgeopt";

  function fmt(v, unit) {
    if (v === null || v === undefined || isNaN(v)) return "–";
    var a = Math.abs(v), s;
    if (unit === "bytes") {
      var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
      while (a >= 1024 && i < u.length - 1) { a /= 1024; v /= 1024; i++; }
      return (a >= 100 ? v.toFixed(0) : v.toFixed(1)) + " " + u[i];
    }
    s = a >= 1000 ? (v / 1000).toFixed(a >= 10000 ? 0 : 1) + "k" : a >= 10 ? v.toFixed(0) : a >= 1 ? v.toFixed(1) :
      a === 0 ? "0" : v.toPrecision(2);
    return unit ? s + " " + unit : s;
  }

  function el_(tag, attrs, parent, text) {
    var n = document.createElement(tag);
    for (var k in attrs) { if (attrs[k] !== undefined) n.setAttribute(k, attrs[k]); }
    if (text !== undefined) n.textContent = text;
    if (parent) parent.appendChild(n);
    return n;
  }

  function iso(sec) { return new Date(sec * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC"; }

  /* One aligned table for uPlot: x in epoch seconds, one array per series (null = gap). */
  function align(series) {
    var xs = {}, keys;
    series.forEach(function (s) { s.points.forEach(function (p) { xs[p[0]] = true; }); });
    keys = Object.keys(xs).map(Number).sort(function (a, b) { return a - b; });
    var data = [keys.map(function (t) { return t / 1000; })];
    series.forEach(function (s) {
      var by = {};
      s.points.forEach(function (p) { by[p[0]] = p[1] === undefined ? null : p[1]; });
      data.push(keys.map(function (t) { return by[t] === undefined ? null : by[t]; }));
    });
    return data;
  }

  function summary(series, data, unit) {
    var parts = series.map(function (s, i) {
      var vals = data[i + 1].filter(function (v) { return v !== null; });
      if (!vals.length) return s.name + ": no data";
      return s.name + ": min " + fmt(Math.min.apply(null, vals), unit) + ", max " + fmt(Math.max.apply(null, vals), unit) +
        ", last " + fmt(vals[vals.length - 1], unit);
    });
    var n = data[0].length;
    return n ? (n + " points from " + iso(data[0][0]) + " to " + iso(data[0][n - 1]) + ". " + parts.join("; ") + ".") : "no data";
  }

  function table(parent, series, data, unit) {
    var det = el_("details", {"class": "chart-data"}, parent);
    el_("summary", {}, det, "Data table");
    var t = el_("table", {}, det), head = el_("tr", {}, el_("thead", {}, t)), body = el_("tbody", {}, t);
    el_("th", {scope: "col"}, head, "time (UTC)");
    series.forEach(function (s) { el_("th", {scope: "col"}, head, s.name + (unit ? " (" + unit + ")" : "")); });
    for (var i = 0; i < data[0].length; i++) {
      var tr = el_("tr", {}, body);
      el_("td", {}, tr, iso(data[0][i]));
      for (var j = 1; j < data.length; j++) el_("td", {}, tr, data[j][i] === null ? "" : String(data[j][i]));
    }
  }

  function markerPlugin(el, markers) {
    return {hooks: {draw: [function (u) {
      var ctx = u.ctx, top = u.bbox.top, h = u.bbox.height, shown = 0;
      ctx.save();
      ctx.setLineDash([5, 4]);
      ctx.strokeStyle = "#6b4fbb";
      ctx.fillStyle = "#6b4fbb";
      ctx.lineWidth = 1.5 * devicePixelRatio;
      ctx.font = (11 * devicePixelRatio) + "px sans-serif";
      markers.forEach(function (mk) {
        var x = u.valToPos(mk.t / 1000, "x", true);
        if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
        ctx.beginPath();
        ctx.moveTo(x, top);
        ctx.lineTo(x, top + h);
        ctx.stroke();
        ctx.fillText(mk.label, x + 4 * devicePixelRatio, top + 12 * devicePixelRatio);
        shown++;
      });
      ctx.restore();
      el.setAttribute("data-markers", String(shown));
    }]}};
  }

  function line(el, opts) {
    if (el._uplot) { el._uplot.destroy(); el._uplot = null; }
    if (el._onResize) window.removeEventListener("resize", el._onResize);
    el.innerHTML = "";
    var unit = opts.unit || "";
    var series = (opts.series || []).filter(function (s) { return s.points && s.points.length; });
    var data = align(series);
    var drawn = 0;
    for (var j = 1; j < data.length; j++) drawn += data[j].filter(function (v) { return v !== null; }).length;
    el.setAttribute("data-points", String(drawn));
    if (!drawn) {
      el_("p", {"class": "empty"}, el, opts.emptyText || "no data in this range");
      el.setAttribute("aria-label", "no data in this range");
      return null;
    }
    var x0 = opts.xMin !== undefined ? opts.xMin / 1000 : data[0][0];
    var x1 = opts.xMax !== undefined ? opts.xMax / 1000 : data[0][data[0].length - 1];
    if (x1 <= x0) { x0 -= 30; x1 += 30; }
    var text = summary(series, data, unit);
    el.setAttribute("role", "group");
    el.setAttribute("aria-label", (opts.title ? opts.title + ": " : "") + text);
    var bar = el_("div", {"class": "chart-tools"}, el);
    var reset = el_("button", {type: "button", "class": "reset-zoom", title: "Show the whole range again"}, bar, "Reset zoom");
    if (opts.csv) el_("a", {href: opts.csv, "class": "csv-export", download: ""}, bar, "CSV");
    if (opts.logToggle) {
      var lab = el_("label", {"class": "log-toggle"}, bar);
      var box = el_("input", {type: "checkbox"}, lab);
      lab.appendChild(document.createTextNode(" log scale"));
      box.checked = !!opts.log;
      box.addEventListener("change", function () {
        var again = {};
        for (var k in opts) again[k] = opts[k];
        again.log = box.checked;
        line(el, again);
        var nb = el.querySelector(".log-toggle input");
        if (nb) nb.focus();
      });
    }
    var plot = el_("div", {"class": "chart-plot", "aria-hidden": "true"}, el);
    el_("p", {"class": "sr-only"}, el, text);
    table(el, series, data, unit);
    var yScale = opts.log ? {distr: 3, log: 10} : {range: function (u, lo, hi) { return [Math.min(0, lo), hi > 0 ? hi * 1.05 : 1]; }};
    var cfg = {
      width: Math.max(200, el.clientWidth || 600),
      height: opts.height || 220,
      scales: {x: {time: true, min: x0, max: x1}, y: yScale},
      axes: [{}, {size: 64, values: function (u, vals) { return vals.map(function (v) { return fmt(v, unit); }); }}],
      series: [{value: function (u, v) { return v === null ? "–" : iso(v); }}].concat(series.map(function (s) {
        return {label: s.name, stroke: s.color, width: 2, spanGaps: false,
                value: function (u, v) { return fmt(v, unit); }};
      })),
      cursor: {sync: {key: opts.sync || SYNC, setSeries: false}, drag: {x: true, y: false}},
      legend: {live: true},
      plugins: opts.markers && opts.markers.length ? [markerPlugin(el, opts.markers)] : [],
      hooks: {
        setScale: [function (u, key) {
          if (key !== "x") return;
          el.setAttribute("data-x-min", String(Math.round(u.scales.x.min)));
          el.setAttribute("data-x-max", String(Math.round(u.scales.x.max)));
          el.setAttribute("data-zoomed", String(Math.round(u.scales.x.min) > Math.round(x0) || Math.round(u.scales.x.max) < Math.round(x1)));
        }],
        setLegend: [function (u) {
          var legend = u.root.querySelector(".u-legend");
          if (legend) el.setAttribute("data-readout", legend.textContent.replace(/\s+/g, " ").trim());
        }]
      }
    };
    if (opts.bands && series.length === 3) {
      // p95..p99 and p50..p95 filled: the spread of the tail at a glance
      cfg.bands = [{series: [3, 2], fill: "rgba(194, 48, 48, 0.10)"}, {series: [2, 1], fill: "rgba(217, 130, 43, 0.14)"}];
    }
    if (!opts.markers || !opts.markers.length) el.setAttribute("data-markers", "0");
    el.setAttribute("data-log", String(!!opts.log));
    var u = new uPlot(cfg, data, plot);
    el._uplot = u;
    reset.addEventListener("click", function () { u.setScale("x", {min: x0, max: x1}); });
    el._onResize = function () { u.setSize({width: Math.max(200, el.clientWidth || 600), height: cfg.height}); };
    window.addEventListener("resize", el._onResize);
    return u;
  }

  function node(tag, attrs, parent) {
    var n = document.createElementNS(NS, tag);
    for (var k in attrs) { if (attrs[k] !== undefined) n.setAttribute(k, attrs[k]); }
    if (parent) parent.appendChild(n);
    return n;
  }

  function niceStep(span, target) {
    var raw = span / Math.max(1, target), mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var norm = raw / mag;
    return (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  }

  /* Bars (batch-size distribution): a few labelled categories, not a time series, so plain SVG. */
  function bars(el, opts) {
    el.innerHTML = "";
    var vals = opts.values || [], labels = opts.labels || [];
    var w = el.clientWidth || 600, h = el.clientHeight || 240;
    var svg = node("svg", {viewBox: "0 0 " + w + " " + h, preserveAspectRatio: "none", role: "img"}, el);
    var iw = w - M.left - M.right, ih = h - M.top - M.bottom;
    if (!vals.length) {
      svg.setAttribute("aria-label", "no data in this range");
      node("text", {x: w / 2, y: h / 2, "text-anchor": "middle", "class": "empty"}, svg).textContent = "no data in this range";
      el.setAttribute("data-points", "0");
      return;
    }
    svg.setAttribute("aria-label", labels.map(function (l, i) { return l + ": " + fmt(vals[i], opts.unit); }).join(", "));
    var ymax = Math.max.apply(null, vals) * 1.05 || 1, step = niceStep(ymax, 4), top = Math.ceil(ymax / step) * step || 1;
    for (var v = 0; v <= top + step / 2; v += step) {
      var y = M.top + ih - (v / top) * ih;
      node("line", {x1: M.left, x2: M.left + iw, y1: y, y2: y, "class": "grid-line"}, svg);
      node("text", {x: M.left - 6, y: y + 4, "text-anchor": "end"}, svg).textContent = fmt(v, opts.unit);
    }
    var bw = iw / vals.length;
    vals.forEach(function (v, i) {
      var bh = (v / top) * ih, r = node("rect", {x: M.left + i * bw + bw * 0.12, y: M.top + ih - bh, width: bw * 0.76, height: bh, "class": "bar"}, svg);
      node("title", {}, r).textContent = labels[i] + ": " + fmt(v, opts.unit);
      if (vals.length <= 16) node("text", {x: M.left + (i + 0.5) * bw, y: h - 8, "text-anchor": "middle"}, svg).textContent = labels[i];
    });
    el.setAttribute("data-points", String(vals.length));
  }

  window.EdgeCharts = {line: line, bars: bars, fmt: fmt};
})();
