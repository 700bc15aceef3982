// Refreshes the live part of the status page (GET /fragment) without reloading the page.
"use strict";
(function () {
  var live = document.getElementById("live");
  var period = 1000 * Number(document.body.getAttribute("data-refresh-s") || "3");
  function bars() {
    var all = document.querySelectorAll(".bar > div[data-pct]");
    for (var i = 0; i < all.length; i++) {
      all[i].style.width = Math.min(100, Number(all[i].getAttribute("data-pct"))) + "%";
    }
  }
  function refresh() {
    fetch("/fragment", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        live.innerHTML = html;
        bars();
        document.body.classList.remove("stale");
      })
      .catch(function () { document.body.classList.add("stale"); })
      .finally(function () { setTimeout(refresh, period); });
  }
  bars();
  setTimeout(refresh, period);
})();
