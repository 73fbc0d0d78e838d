// slimta dashboard: relative times, delete confirmation and the live view.
// The live view polls the JSON URL in <body data-live> every data-refresh
// milliseconds and rebuilds the table from it with textContent only, so
// nothing from a message is ever parsed as HTML.
(function () {
  "use strict";

  var body = document.body;
  var offset = 0; // server clock minus ours, in seconds

  function serverNow() {
    return Date.now() / 1000 + offset;
  }

  function span(seconds) {
    var s = Math.floor(seconds);
    if (s < 60) { return s + " s"; }
    if (s < 3600) { return Math.floor(s / 60) + " min"; }
    if (s < 86400) {
      return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    }
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  // the same text as slimta.app.dashboard.format_relative
  function relative(ts, now) {
    var delta = ts - now;
    if (Math.abs(delta) < 1) { return "now"; }
    return delta > 0 ? "in " + span(delta) : span(-delta) + " ago";
  }

  function absolute(ts) {
    var iso = new Date(ts * 1000).toISOString();
    return iso.slice(0, 10) + " " + iso.slice(11, 19) + " UTC";
  }

  function refreshTimes() {
    var now = serverNow();
    var spans = document.querySelectorAll(".rel[data-ts]");
    for (var i = 0; i < spans.length; i++) {
      spans[i].textContent = relative(Number(spans[i].getAttribute("data-ts")), now);
    }
  }

  // el("td", {"class": "num"}, ["text", otherNode]): attributes and text are never HTML
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    var name;
    for (name in attrs || {}) {
      if (Object.prototype.hasOwnProperty.call(attrs, name)) {
        node.setAttribute(name, attrs[name]);
      }
    }
    (children || []).forEach(function (child) {
      if (child === null || child === undefined) { return; }
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function rel(ts) {
    return el("span", {"class": "rel", "data-ts": String(ts)}, [relative(ts, serverNow())]);
  }

  function when(ts) {
    if (!ts) { return ["—"]; }
    return [el("time", {datetime: new Date(ts * 1000).toISOString()}, [absolute(ts)]),
            " (", rel(ts), ")"];
  }

  function replaceRows(table, rows) {
    var tbody = table.tBodies[0];
    var fresh = el("tbody", {}, rows);
    table.replaceChild(fresh, tbody);
  }

  function renderOverview(data) {
    var table = document.getElementById("overview");
    if (!table) { return; }
    var rows = data.queues.map(function (q) {
      var name = el("td", {"data-field": "name"}, [el("a", {href: q.url}, [q.name])]);
      if (q.error) {
        return el("tr", {"data-queue": q.name}, [
          name, el("td", {colspan: "9", "class": "problem"}, ["cannot be read: " + q.error])]);
      }
      function hour(key) {
        return q.last_hour ? String(q.last_hour[key] || 0) : "—";
      }
      var cells = [
        ["messages", String(q.messages)], ["queued", String(q.queued)],
        ["deferred", String(q.deferred)], ["held", String(q.held)],
        ["attempting", String(q.attempting)],
        ["oldest", q.oldest ? rel(q.oldest) : "—"],
        ["delivered_1h", hour("delivered")], ["bounced_1h", hour("bounced")],
        ["deferred_1h", hour("deferred")]
      ].map(function (c) { return el("td", {"data-field": c[0]}, [c[1]]); });
      return el("tr", {"data-queue": q.name}, [name].concat(cells));
    });
    if (!rows.length) {
      rows = [el("tr", {}, [el("td", {colspan: "10"}, ["No queue stores messages."])])];
    }
    replaceRows(table, rows);
  }

  function summary(data) {
    var n = data.matching;
    var text = n + " message" + (n === 1 ? "" : "s");
    if (data.q) { text += " matching “" + data.q + "” (of " + data.total + ")"; }
    return text + ", page " + data.page + " of " + data.pages;
  }

  function renderMessages(data) {
    var table = document.getElementById("messages");
    if (!table) { return; }
    var rows = data.entries.map(function (e) {
      var rcpts = [];
      e.recipients.forEach(function (r, i) {
        if (i) { rcpts.push(el("br")); }
        rcpts.push(r);
      });
      var attrs = {"data-id": e.id};
      if (e.held) { attrs["class"] = "held"; }
      return el("tr", attrs, [
        el("td", {"class": "id"}, [el("a", {href: e.url}, [e.id])]),
        el("td", {}, [e.sender ? e.sender : "<>"]),
        el("td", {}, rcpts),
        el("td", {"class": "num"}, [String(e.attempts)]),
        el("td", {}, when(e.next_attempt)),
        el("td", {"class": "reply"}, [e.last_reply || "—"]),
        el("td", {}, [e.held ? el("span", {"class": "badge held"}, ["held"]) : null])
      ]);
    });
    if (!rows.length) {
      rows = [el("tr", {"class": "empty"}, [el("td", {colspan: "7"}, ["No messages."])])];
    }
    replaceRows(table, rows);
    var sum = document.getElementById("summary");
    if (sum) { sum.textContent = summary(data); }
    renderPager(data);
  }

  // the same links as Dashboard._pager: previous and next page, keeping q and per_page
  function renderPager(data) {
    var pager = document.getElementById("pager");
    if (!pager) { return; }
    var base = pager.getAttribute("data-base");
    var defaultPerPage = Number(pager.getAttribute("data-default-per-page"));
    function link(page, text, rel) {
      var params = new URLSearchParams();
      if (data.q) { params.set("q", data.q); }
      params.set("page", String(page));
      if (data.per_page !== defaultPerPage) { params.set("per_page", String(data.per_page)); }
      return el("a", {rel: rel, href: base + "?" + params.toString()}, [text]);
    }
    var links = [];
    if (data.page > 1) { links.push(link(data.page - 1, "← Previous", "prev")); }
    if (data.page < data.pages) { links.push(link(data.page + 1, "Next →", "next")); }
    while (pager.firstChild) { pager.removeChild(pager.firstChild); }
    links.forEach(function (a, i) {
      if (i) { pager.appendChild(document.createTextNode(" ")); }
      pager.appendChild(a);
    });
  }

  var renderers = {overview: renderOverview, messages: renderMessages};

  function setStatus(text, failed) {
    var node = document.getElementById("live-status");
    if (!node) { return; }
    node.textContent = text;
    node.className = failed ? "live-status failed" : "live-status";
  }

  function poll(url, every, render) {
    var request = new XMLHttpRequest();
    request.open("GET", url);
    request.setRequestHeader("Accept", "application/json");
    request.responseType = "json";
    request.onload = function () {
      if (request.status === 200 && request.response) {
        var data = request.response;
        offset = data.now - Date.now() / 1000;
        render(data);
        setStatus("live · updated " + new Date().toLocaleTimeString(), false);
        body.setAttribute("data-updated", String(data.now));
      } else {
        setStatus("live view: HTTP " + request.status, true);
      }
    };
    request.onerror = function () { setStatus("live view: cannot reach slimta", true); };
    request.onloadend = function () { window.setTimeout(function () {
      poll(url, every, render);
    }, every); };
    request.send();
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { event.preventDefault(); }
  });

  if (body.hasAttribute("data-now")) {
    offset = Number(body.getAttribute("data-now")) - Date.now() / 1000;
  }
  window.setInterval(refreshTimes, 1000);

  var live = body.getAttribute("data-live");
  var render = renderers[body.getAttribute("data-view")];
  if (live && render) {
    var every = Number(body.getAttribute("data-refresh")) || 3000;
    window.setTimeout(function () { poll(live, every, render); }, every);
  }
}());
