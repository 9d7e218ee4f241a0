"""The spawner's options form: built from what the core offers the hub user, read back into options.

Pure functions (no I/O): :func:`machines` turns the core's remotes, flavors and nodes into the choices a
user has, :func:`render_form` makes the HTML (with a filter by name and by GPUs that runs in the
browser), and :func:`parse_form` reads what the browser sent back, refusing anything that was not
offered. The spawner fetches the catalog as the hub user (each user sees what their own identity may
use) and saves uploaded notebooks (spawner.py).
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from typing import Any

from skyport.models import Flavor, Image, Node, Remote

#: Kinds of remote whose capacity exists already (nodes), as opposed to flavors made on demand.
STATIC_KINDS = frozenset({"local", "ssh", "slurm", "agent"})
#: A notebook's file name as uploaded: a plain name, no directories.
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()+,=@-]{0,254}$")
GIB = 1024**3


class FormError(ValueError):
    """The form's data cannot be used; the message is shown to the user."""


@dataclass(frozen=True)
class Machine:
    """One choice of where to run: a static remote's nodes, or a flavor (a machine made on demand)."""

    key: str  # the form's value: "remote:<remote>" or "flavor:<remote>:<flavor>"
    remote: str
    flavor: str  # "" for a static remote
    cpus: int
    mem: int
    gpus: int
    price: float  # per hour; 0 for a static remote

    @property
    def label(self) -> str:
        return self.flavor or f"{self.remote} nodes"


def machines(remotes: list[Remote], flavors: list[Flavor], nodes: list[Node]) -> list[Machine]:
    """Every place the user can start a server: static remotes first (largest node), then flavors by
    price. A static remote with no node up yet is still offered (its nodes may come)."""
    by_id = {r.id: r for r in remotes}
    out: list[Machine] = []
    for remote in sorted(remotes, key=lambda r: r.name):
        if remote.kind not in STATIC_KINDS:
            continue
        own = [n for n in nodes if n.remote_id == remote.id]
        biggest = max(own, key=lambda n: (n.gpus, n.cpus, n.mem), default=None)
        out.append(
            Machine(
                key=f"remote:{remote.name}",
                remote=remote.name,
                flavor="",
                cpus=biggest.cpus if biggest else 0,
                mem=biggest.mem if biggest else 0,
                gpus=biggest.gpus if biggest else 0,
                price=0.0,
            )
        )
    for flavor in sorted(flavors, key=lambda f: (f.price, f.name)):
        owner = by_id.get(flavor.remote_id)
        if owner is None:
            continue
        out.append(
            Machine(
                key=f"flavor:{owner.name}:{flavor.name}",
                remote=owner.name,
                flavor=flavor.name,
                cpus=flavor.cpus,
                mem=flavor.mem,
                gpus=flavor.gpus,
                price=flavor.price,
            )
        )
    return out


def images_by_remote(remotes: list[Remote], images: list[Image]) -> dict[str, list[str]]:
    """Cloud images each remote offers (by remote name); a flavor's machine boots one of them."""
    names = {r.id: r.name for r in remotes}
    found: dict[str, list[str]] = {}
    for image in sorted(images, key=lambda i: i.name):
        if image.kind == "cloud" and image.remote_id in names:
            found.setdefault(names[image.remote_id], []).append(image.name)
    return found


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.0f} GiB" if nbytes >= GIB else (f"{nbytes // 1024**2} MiB" if nbytes else "-")


_STYLE = """
<style>
  .skyport-form table { width: 100%; margin: 0.5em 0 1em; }
  .skyport-form td, .skyport-form th { padding: 0.25em 0.5em; }
  .skyport-form tr.sp-hidden { display: none; }
  .skyport-form .sp-filters { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; }
  .skyport-form .sp-filters input { width: auto; display: inline-block; }
  .skyport-form .sp-price { text-align: right; }
</style>
"""

_SCRIPT = """
<script>
(function () {
  const root = document.currentScript.closest('.skyport-form');
  const images = JSON.parse(root.dataset.images);
  const filter = root.querySelector('#sp-filter');
  const gpus = root.querySelector('#sp-gpus');
  const select = root.querySelector('#sp-image');
  function showImages() {
    const chosen = root.querySelector('input[name=machine]:checked');
    const row = chosen ? chosen.closest('tr') : null;
    const list = row && row.dataset.flavor ? (images[row.dataset.remote] || []) : [];
    select.innerHTML = '';
    const none = document.createElement('option');
    none.value = ''; none.textContent = list.length ? 'the remote\\'s default image' : '(not needed)';
    select.appendChild(none);
    for (const name of list) {
      const option = document.createElement('option');
      option.value = name; option.textContent = name; select.appendChild(option);
    }
    select.disabled = !list.length;
  }
  function apply() {
    const text = filter.value.trim().toLowerCase();
    const min = parseInt(gpus.value || '0', 10) || 0;
    for (const row of root.querySelectorAll('tbody tr')) {
      const hide = (text && !row.dataset.search.includes(text)) || parseInt(row.dataset.gpus, 10) < min;
      row.classList.toggle('sp-hidden', hide);
      if (hide) { const radio = row.querySelector('input'); if (radio.checked) radio.checked = false; }
    }
    if (!root.querySelector('input[name=machine]:checked')) {
      const first = root.querySelector('tbody tr:not(.sp-hidden) input');
      if (first) first.checked = true;
    }
    showImages();
  }
  filter.addEventListener('input', apply);
  gpus.addEventListener('input', apply);
  for (const radio of root.querySelectorAll('input[name=machine]')) {
    radio.addEventListener('change', showImages);
  }
  apply();
})();
</script>
"""


def render_form(choices: list[Machine], images: dict[str, list[str]], *, currency: str = "") -> str:
    """The form's HTML (inside the hub's own ``<form>``, which posts multipart: uploads work)."""
    esc = html.escape
    rows = []
    for index, m in enumerate(choices):
        search = f"{m.remote} {m.flavor} {m.label}".lower()
        price = f"{m.price:.4g} {esc(currency)}".strip() if m.flavor else "-"
        rows.append(
            f'<tr data-remote="{esc(m.remote)}" data-flavor="{esc(m.flavor)}" data-gpus="{m.gpus}" '
            f'data-search="{esc(search)}">'
            f'<td><input type="radio" name="machine" id="sp-m{index}" value="{esc(m.key)}"'
            f"{' checked' if index == 0 else ''}></td>"
            f'<td><label for="sp-m{index}">{esc(m.label)}</label></td>'
            f"<td>{esc(m.remote)}</td><td>{m.cpus or '-'}</td><td>{_size(m.mem)}</td>"
            f'<td>{m.gpus}</td><td class="sp-price">{price}</td></tr>'
        )
    if not rows:
        rows.append(
            '<tr><td colspan="7">Sky Port offers you nowhere to run: ask your administrator.</td></tr>'
        )
    return (
        f"{_STYLE}<div class=\"skyport-form\" data-images='{esc(json.dumps(images), quote=True)}'>"
        '<div class="sp-filters">'
        '<label>Filter <input id="sp-filter" type="search" placeholder="name" class="form-control"></label>'
        '<label>At least <input id="sp-gpus" type="number" min="0" value="0" class="form-control"> GPUs'
        "</label></div>"
        '<table class="table table-sm" id="sp-machines"><thead><tr><th></th><th>Machine</th><th>Where</th>'
        '<th>CPUs</th><th>Memory</th><th>GPUs</th><th class="sp-price">Price / hour</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        '<label for="sp-image">Image</label>'
        '<select id="sp-image" name="image" class="form-control"></select>'
        '<label for="sp-notebooks" style="margin-top:1em">Notebooks to take along (they come back when '
        "the server stops)</label>"
        '<input id="sp-notebooks" type="file" name="notebooks" multiple class="form-control">'
        f"{_SCRIPT}</div>"
    )


@dataclass(frozen=True)
class Upload:
    name: str
    body: bytes


def parse_form(
    form: dict[str, list[Any]], choices: list[Machine], images: dict[str, list[str]], *, max_bytes: int
) -> tuple[dict[str, Any], list[Upload]]:
    """The user's options (JSON-able, kept by the hub) and the uploaded notebooks.

    Only what the form offered is accepted: the machine must be one of ``choices`` and the image one of
    its remote's; upload names must be plain file names.
    """
    key = (form.get("machine") or [""])[0]
    chosen = next((m for m in choices if m.key == key), None)
    if chosen is None:
        raise FormError("choose a machine from the list")
    image = (form.get("image") or [""])[0]
    if image and (not chosen.flavor or image not in images.get(chosen.remote, [])):
        raise FormError(f"image {image!r} is not offered for {chosen.label}")
    uploads: list[Upload] = []
    total = 0
    for part in form.get("notebooks_file", []):
        name = str(part.get("filename") or "")
        body = part.get("body") or b""
        if not name and not body:
            continue  # the empty part a browser sends when no file was chosen
        if not _FILE_NAME.match(name):
            raise FormError(f"{name!r} is not a plain file name")
        total += len(body)
        if total > max_bytes:
            raise FormError(f"the notebooks are larger than {max_bytes // 1024**2} MiB together")
        uploads.append(Upload(name, bytes(body)))
    options = {
        "machine": chosen.key,
        "remote": chosen.remote,
        "flavor": chosen.flavor,
        "gpus": chosen.gpus if chosen.flavor else 0,
        "image": image,
    }
    return options, uploads
