/* Meterline console: small progressive enhancements. Every page works without this file;
   it draws the charts (uPlot), asks before destructive forms, copies new keys, and submits
   filter forms when a select changes. */
(function () {
  "use strict";

  function ready(fn) {
    if (document.readyState !== "loading") fn();
    else document.addEventListener("DOMContentLoaded", fn);
  }

  // Money arrives as exact decimal strings; the chart needs numbers for its geometry only.
  // Labels and the legend print the exact strings.
  var MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

  function dayLabel(iso) {
    var parts = iso.split("-");
    return Number(parts[2]) + " " + MONTHS[Number(parts[1]) - 1];
  }

  // Axis labels: as many decimals as the tick step needs (the figures themselves are exact).
  function money(vals, step) {
    var decimals = Math.min(6, Math.max(step >= 1 ? 0 : 2, -Math.floor(Math.log10(step || 1))));
    return vals.map(function (v) { return "$" + v.toFixed(v === 0 ? 0 : decimals); });
  }

  function chartHeight(el) { return el.clientWidth < 500 ? 210 : 260; }

  // Days on an index axis (one bar per UTC day, labelled from the data: no time-zone guess).
  function dailyChart(el, data) {
    var xs = data.days.map(function (d, i) { return i; });
    var ys = data.cost.map(Number);
    var opts = {
      width: el.clientWidth,
      height: chartHeight(el),
      padding: [14, 10, 0, 4],
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      legend: { live: true },
      scales: {
        x: { time: false, range: function () { return [-0.6, Math.max(xs.length - 0.4, 0.4)]; } },
        y: { range: function (u, lo, hi) { return [0, hi > 0 ? hi * 1.12 : 1]; } },
      },
      series: [
        { label: "Day (UTC)", value: function (u, v, si, i) { return i == null ? "point at a bar" : data.days[i]; } },
        {
          label: "Spend (USD, exact)",
          stroke: "#3156d3",
          fill: "rgba(49, 86, 211, 0.55)",
          width: 1,
          paths: uPlot.paths.bars({ size: [0.72, 48] }),
          points: { show: false },
          value: function (u, v, si, i) {
            return i == null ? "" : "$" + data.cost[i] + " · " + data.requests[i].toLocaleString("en") + " requests";
          },
        },
      ],
      axes: [
        {
          stroke: "#667085", grid: { show: false }, ticks: { stroke: "#e4e7ec" }, space: 44,
          incrs: [1, 2, 3, 5, 7, 10, 14],
          values: function (u, splits) {
            return splits.map(function (i) { return data.days[i] ? dayLabel(data.days[i]) : ""; });
          },
        },
        {
          stroke: "#667085", size: 58, grid: { stroke: "#eef0f3" }, ticks: { show: false },
          values: function (u, vals, axis, space, step) { return money(vals, step); },
        },
      ],
    };
    var plot = new uPlot(opts, [xs, ys], el);
    el.setAttribute("data-drawn", String(xs.length));
    el.setAttribute("data-nonzero", String(ys.filter(function (y) { return y > 0; }).length));
    if (window.performance && performance.mark) performance.mark("meterline:chart-drawn");
    if ("ResizeObserver" in window) {
      new ResizeObserver(function () {
        if (el.clientWidth && Math.abs(el.clientWidth - plot.width) > 2) {
          plot.setSize({ width: el.clientWidth, height: chartHeight(el) });
        }
      }).observe(el);
    }
  }

  ready(function () {
    // A chart drawn on the server is on screen from the first frame the page paints.
    if (document.querySelector("figure.daily[data-drawn]") && window.performance && performance.mark) {
      requestAnimationFrame(function () { performance.mark("meterline:chart-painted"); });
    }
    document.querySelectorAll("[data-chart]").forEach(function (el) {
      var source = document.getElementById(el.getAttribute("data-source"));
      if (!source || typeof uPlot === "undefined") return;
      var data = JSON.parse(source.textContent);
      if (el.getAttribute("data-chart") === "daily") dailyChart(el, data);
    });

    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
      });
    });

    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var text = document.getElementById(button.getAttribute("data-copy")).textContent;
        if (navigator.clipboard) {
          navigator.clipboard.writeText(text).then(function () { button.textContent = "Copied"; });
        }
      });
    });

    document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
      select.addEventListener("change", function () { select.form.requestSubmit(); });
    });
  });
})();
