/* edgeopt charts: a tiny SVG line/bar chart drawer, served by the app itself (no CDN, works offline).
 *
 * EdgeCharts.line(el, {series: [{name, color, points: [[timeMs, value], ...]}], unit})
 * EdgeCharts.bars(el, {labels: [...], values: [...], unit})
 * Each series becomes one <path class="series"> plus a <circle class="pt"> per point, so a test can
 * check that data was drawn. Gaps (null values) break the line.
 */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var M = {top: 12, right: 14, bottom: 26, left: 56};

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

  function fmt(v, unit) {
    var a = Math.abs(v), s;
    if (unit === "bytes") {
      var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
      while (a >= 1024 && i < u.length - 1) { a /= 1024; v /= 1024; i++; }
      return (a >= 100 ? v.toFixed(0) : v.toFixed(1)) + " " + u[i];
    }
    s = a >= 1000 ? (v / 1000).toFixed(a >= 10000 ? 0 : 1) + "k" : a >= 10 ? v.toFixed(0) : a >= 1 ? v.toFixed(1) : v.toPrecision(2);
    return unit ? s + " " + unit : s;
  }

  function timeLabel(ms, spanMs) {
    var d = new Date(ms), p = function (n) { return (n < 10 ? "0" : "") + n; };
    if (spanMs > 2 * 86400000) return p(d.getMonth() + 1) + "-" + p(d.getDate());
    return p(d.getHours()) + ":" + p(d.getMinutes());
  }

  function frame(el) {
    el.innerHTML = "";
    var w = el.clientWidth || 600, h = el.clientHeight || 240;
    var svg = node("svg", {viewBox: "0 0 " + w + " " + h, preserveAspectRatio: "none", role: "img"}, el);
    return {svg: svg, w: w, h: h, iw: w - M.left - M.right, ih: h - M.top - M.bottom};
  }

  function empty(f, text) {
    node("text", {x: f.w / 2, y: f.h / 2, "text-anchor": "middle", "class": "empty"}, f.svg).textContent = text || "no data in this range";
  }

  function yAxis(f, ymax, unit) {
    var step = niceStep(ymax, 4), top = Math.ceil(ymax / step) * step || 1;
    for (var v = 0; v <= top + step / 2; v += step) {
      var y = M.top + f.ih - (v / top) * f.ih;
      node("line", {x1: M.left, x2: M.left + f.iw, y1: y, y2: y, "class": "grid-line"}, f.svg);
      node("text", {x: M.left - 6, y: y + 4, "text-anchor": "end"}, f.svg).textContent = fmt(v, unit);
    }
    node("line", {x1: M.left, x2: M.left, y1: M.top, y2: M.top + f.ih, "class": "axis"}, f.svg);
    node("line", {x1: M.left, x2: M.left + f.iw, y1: M.top + f.ih, y2: M.top + f.ih, "class": "axis"}, f.svg);
    return top;
  }

  function line(el, opts) {
    var f = frame(el), series = (opts.series || []).filter(function (s) { return s.points && s.points.length; });
    var xs = [], ymax = 0;
    series.forEach(function (s) {
      s.points.forEach(function (p) { if (p[1] !== null && p[1] !== undefined) { xs.push(p[0]); ymax = Math.max(ymax, p[1]); } });
    });
    if (!xs.length) { empty(f, opts.emptyText); el.setAttribute("data-points", "0"); return; }
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    if (opts.xMin !== undefined) x0 = Math.min(x0, opts.xMin);
    if (opts.xMax !== undefined) x1 = Math.max(x1, opts.xMax);
    if (x1 === x0) { x0 -= 30000; x1 += 30000; }
    var top = yAxis(f, ymax * 1.05 || 1, opts.unit);
    var sx = function (t) { return M.left + (t - x0) / (x1 - x0) * f.iw; };
    var sy = function (v) { return M.top + f.ih - (v / top) * f.ih; };
    for (var i = 0; i <= 5; i++) {
      var t = x0 + (x1 - x0) * i / 5;
      node("text", {x: sx(t), y: f.h - 8, "text-anchor": i === 0 ? "start" : i === 5 ? "end" : "middle"}, f.svg).textContent = timeLabel(t, x1 - x0);
    }
    var drawn = 0;
    series.forEach(function (s) {
      var d = "", pen = false, g = node("g", {"data-series": s.name}, f.svg);
      s.points.forEach(function (p) {
        if (p[1] === null || p[1] === undefined) { pen = false; return; }
        d += (pen ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1);
        pen = true;
      });
      node("path", {d: d, "class": "series", stroke: s.color}, g);
      s.points.forEach(function (p) {
        if (p[1] === null || p[1] === undefined) return;
        var c = node("circle", {cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: s.points.length > 120 ? 0 : 2.2, fill: s.color, "class": "pt"}, g);
        node("title", {}, c).textContent = s.name + " " + fmt(p[1], opts.unit) + " at " + new Date(p[0]).toLocaleString();
        drawn++;
      });
    });
    el.setAttribute("data-points", String(drawn));
  }

  function bars(el, opts) {
    var f = frame(el), vals = opts.values || [], labels = opts.labels || [];
    if (!vals.length) { empty(f, opts.emptyText); el.setAttribute("data-points", "0"); return; }
    var top = yAxis(f, Math.max.apply(null, vals) * 1.05 || 1, opts.unit);
    var bw = f.iw / vals.length;
    vals.forEach(function (v, i) {
      var h = (v / top) * f.ih, r = node("rect", {x: M.left + i * bw + bw * 0.12, y: M.top + f.ih - h, width: bw * 0.76, height: h, "class": "bar"}, f.svg);
      node("title", {}, r).textContent = labels[i] + ": " + fmt(v, opts.unit);
      if (vals.length <= 16) node("text", {x: M.left + (i + 0.5) * bw, y: f.h - 8, "text-anchor": "middle"}, f.svg).textContent = labels[i];
    });
    el.setAttribute("data-points", String(vals.length));
  }

  window.EdgeCharts = {line: line, bars: bars, fmt: fmt};
})();
