"""Draw docs/figures/window_attention.png: the local self-attention window.

Left: a pixel inside the map and its k x k window with the relative row and
column offsets the position embeddings are indexed by. Right: a pixel at the
border, whose window taps outside the map are masked out of the softmax.

    python tools/misc/plot_window_attention.py --out docs/figures/window_attention.png
"""
import argparse

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


def draw_panel(ax, size, query, window, title):
    half = window // 2
    qy, qx = query
    for y in range(-half - 1, size + half + 1):
        for x in range(-half - 1, size + half + 1):
            inside_map = 0 <= y < size and 0 <= x < size
            in_window = abs(y - qy) <= half and abs(x - qx) <= half
            if not (inside_map or in_window):
                continue
            if in_window and not inside_map:
                face, hatch, edge = 'white', '////', '#b22222'
            elif (y, x) == (qy, qx):
                face, hatch, edge = '#1f4e9c', None, 'black'
            elif in_window:
                face, hatch, edge = '#9cc3e6', None, 'black'
            else:
                face, hatch, edge = '#eeeeee', None, '#999999'
            ax.add_patch(Rectangle((x, y), 1, 1, facecolor=face, hatch=hatch,
                                   edgecolor=edge, linewidth=0.6))
    ax.add_patch(Rectangle((0, 0), size, size, fill=False, linewidth=2,
                           edgecolor='black'))
    ax.add_patch(Rectangle((qx - half, qy - half), window, window, fill=False,
                           linewidth=2.2, edgecolor='#1f4e9c'))
    ax.set_xlim(-half - 1.5, size + half + 1.5)
    ax.set_ylim(size + half + 1.5, -half - 1.5)
    ax.set_aspect('equal')
    ax.axis('off')
    ax.set_title(title, fontsize=10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='docs/figures/window_attention.png')
    args = parser.parse_args()
    size, window = 12, 7
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5.2))
    draw_panel(left, size, (5, 6), window,
               'pixel (i, j) attends to its 7 x 7 window')
    for offset in range(-3, 4):
        left.text(6 + offset + 0.5, 5 - 3.6, f'{offset:+d}' if offset else '0',
                  ha='center', va='center', fontsize=7, color='#1f4e9c')
        left.text(6 - 3.6, 5 + offset + 0.5, f'{offset:+d}' if offset else '0',
                  ha='center', va='center', fontsize=7, color='#1f4e9c')
    left.text(6 + 0.5, -2.9, 'column offset b - j  (embedding r_col)',
              ha='center', fontsize=7.5, color='#1f4e9c')
    left.text(-2.9, 5 + 0.5, 'row offset a - i\n(embedding r_row)',
              ha='center', va='center', rotation=90, fontsize=7.5,
              color='#1f4e9c')
    draw_panel(right, size, (1, 1), window,
               'at the border: taps outside the map are masked')
    fig.text(
        0.5, 0.04,
        r'$y_{ij} = \sum_{(a,b)\in\mathcal{N}_7(i,j)\cap\,\mathrm{map}}'
        r'\mathrm{softmax}_{ab}\left(q_{ij}^\top k_{ab} + q_{ij}^\top '
        r'r_{a-i,\,b-j}\right)\,v_{ab}$'
        '   per head;  q = W_Q x,  k = W_K x,  v = W_V x',
        ha='center', fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.92, bottom=0.1,
                        wspace=0.05)
    fig.savefig(args.out, dpi=110)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
