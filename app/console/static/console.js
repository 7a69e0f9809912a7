/* The console's only script: refresh a page's figures from its JSON view every
   data-refresh seconds (app/console/figures.py: fields, paths, states, values). The page
   reads the same without it. No inline script anywhere: the CSP allows this file only. */
(function () {
  "use strict";
  var body = document.body;
  var source = body.getAttribute("data-source");
  var every = parseFloat(body.getAttribute("data-refresh") || "0");
  var live = document.getElementById("live");
  if (!source || !(every > 0) || !window.fetch) {
    return;
  }

  function each(selector, attribute, values, apply) {
    var found = document.querySelectorAll(selector);
    for (var i = 0; i < found.length; i++) {
      var name = found[i].getAttribute(attribute);
      if (values && Object.prototype.hasOwnProperty.call(values, name)) {
        apply(found[i], values[name]);
      }
    }
  }

  function show(data) {
    each("[data-field]", "data-field", data.fields, function (el, v) { el.textContent = v; });
    each("[data-path]", "data-path", data.paths, function (el, v) { el.setAttribute("d", v); });
    each("[data-state]", "data-state", data.states,
      function (el, v) { el.setAttribute("data-value", v); });
    each("[data-meter]", "data-meter", data.values, function (el, v) { el.value = v; });
  }

  function say(text) {
    if (live) {
      live.textContent = text;
    }
  }

  var stopped = false;

  function tick() {
    if (stopped) {
      return;
    }
    if (document.hidden) {
      return setTimeout(tick, every * 1000);
    }
    fetch(source, {credentials: "same-origin", cache: "no-store",
                   headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (response.status === 401) {
          stopped = true;
          say("signed out: reload the page to sign in again");
          throw new Error("signed out");
        }
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (data) {
        show(data);
        say("live: refreshed every " + every + " s, last at " +
            new Date().toLocaleTimeString());
      })
      .catch(function (error) {
        if (!stopped) {
          say("the last refresh failed (" + error.message + "); trying again");
        }
      })
      .then(function () {
        if (!stopped) {
          setTimeout(tick, every * 1000);
        }
      });
  }

  say("live: refreshed every " + every + " s");
  setTimeout(tick, every * 1000);
}());
