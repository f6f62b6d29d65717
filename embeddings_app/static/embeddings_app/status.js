/* Refreshes the embedding versions shown on the page from the admin's JSON status endpoint,
   in place: every element with data-ev-id / data-ev-field is one figure of one version.
   Polls every second while a backfill or index build runs, every 5 seconds otherwise. */
(function () {
  "use strict";
  var FAST = 1000, SLOW = 5000;

  function text(status, field) {
    switch (field) {
      case "state": return status.state;
      case "active": return status.active ? "\u2605" : "";
      case "stale": return status.stale === null ? "\u2014" : String(status.stale);
      case "failures": return String(status.failures);
      case "index":
        if (status.index !== "building") return status.index;
        return "building" + (status.index_percent === null ? "" : " " + Math.round(status.index_percent) + "%") +
          " (" + status.index_phase + ")";
      case "last_change": return status.last_change.replace("T", " ");
      default: return status[field] === undefined || status[field] === null ? "" : String(status[field]);
    }
  }

  function apply(config, data) {
    var running = false;
    Object.keys(data.versions).forEach(function (id) {
      var status = data.versions[id];
      running = running || status.running;
      document.querySelectorAll('[data-ev-id="' + id + '"]').forEach(function (el) {
        var field = el.getAttribute("data-ev-field");
        if (field === "bar") {
          el.style.width = (status.percent === null ? 0 : status.percent.toFixed(1)) + "%";
        } else {
          el.textContent = text(status, field);
          if (field === "state") el.className = "ev-badge ev-state-" + status.state;
        }
      });
    });
    if (data.chart !== undefined) {
      var chart = document.getElementById("ev-chart");
      if (chart) chart.innerHTML = data.chart;  // SVG rendered (and escaped) by the server
    }
    config.setAttribute("data-polls", String(Number(config.getAttribute("data-polls")) + 1));
    return running;
  }

  function start() {
    var config = document.getElementById("ev-status");
    if (!config) return;
    var ids = [];
    document.querySelectorAll("[data-ev-id]").forEach(function (el) {
      var id = el.getAttribute("data-ev-id");
      if (ids.indexOf(id) < 0) ids.push(id);
    });
    if (!ids.length) return;
    var query = ids.map(function (id) { return "id=" + encodeURIComponent(id); }).join("&");
    if (config.getAttribute("data-chart")) query += "&chart=" + encodeURIComponent(config.getAttribute("data-chart"));
    var url = config.getAttribute("data-url") + "?" + query;

    function poll() {
      fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
        .then(function (response) {
          if (!response.ok) throw new Error("status " + response.status);
          return response.json();
        })
        .then(function (data) { window.setTimeout(poll, apply(config, data) ? FAST : SLOW); })
        .catch(function () { window.setTimeout(poll, SLOW); });
    }
    window.setTimeout(poll, FAST);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
